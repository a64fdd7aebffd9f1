"""The contract between the targets job and the distill job: codecs, the WebDataset shard format and
its manifest, the sample order and the reader. Never imports `jobs` or the engine.
"""
