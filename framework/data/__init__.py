"""Data: every dataset yields the one sample dict of `sample.py`.

Modules, in the order data flows: `io` (reading files, `DataError`), `sample` (the format, crops, `collate`),
`builtin` (offline generated scenes and photos), `adapters` (real datasets in their on-disk layouts),
`compose` (`Degraded`, `WeightedConcat`), `config` (the data YAML -> per-task datasets).
Import from the modules themselves; this package imports nothing, so `framework.degrade` can use `io`.
"""
