"""``python -m bench ...``: the ``specdec`` command line with the benchmark commands, for a plain
checkout where the package (and so its entry points) is not installed."""

from bench.chat_bench import bench_chat
from bench.cli import bench
from bench.verify_cost import bench_verify
from specdec.cli import main

for command in (bench, bench_chat, bench_verify):
    if command.name not in main.commands:
        main.add_command(command)

main()
