"""Puzzle (arXiv 2411.19146): a library of block variants per sub-block, replace-one-block scores, and an exact
integer program choosing one variant per sub-block under parameter / KV-cache / latency budgets."""
