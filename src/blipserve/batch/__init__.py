"""``blipserve batch``: sources -> engine (local | ray) -> sinks, with a progress record.

sources.py    find input files, stream their rows, cut them into chunks
job.py        the run's settings (BatchSpec), its plan and manifest, the error budget
local.py      prefetch pipeline (decode threads) + batched model loop, per chunk
ray_engine.py the same chunks on Ray Data actors
progress.py   on-disk record: manifest + atomically committed parts
sinks.py      merge parts into predictions.csv | .jsonl | .parquet
runner.py     one run: plan, resume, process, merge, summarise
main.py       argparse and exit codes
"""
