"""The acceptance-rate scheduler: which tree size to verify each step (`scheduler`), from measured
verify costs (`costs`) and calibrated acceptance of each drafter's nodes (`calibration`)."""
