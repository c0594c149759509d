"""The token pipeline: text files -> documents -> token shards -> batches.

`files` streams documents out of users' own files (text, JSONL, CSV, Parquet, compressed or not);
`shards` tokenises them into flat binary token files (`lmforge data prepare`) that a loader memory-maps;
`loaders` cuts those tokens into deterministic, resumable batches, one loader per training objective.
Nothing is re-exported here: `lmforge.data` imports `files`, and that must not pull in torch (`loaders`)
for commands that need no model.
"""
