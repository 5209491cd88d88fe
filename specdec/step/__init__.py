"""The decode step for one sequence: propose -> verify -> accept -> compact -> observe -> schedule
(`engine`), with what a decode asks for and returns (`request`), the acceptance rules (`accept`,
`sampling`), the tree-attention forward (`verify`) and which models it can run (`support`)."""
