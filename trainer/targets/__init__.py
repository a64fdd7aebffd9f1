"""The contract between the targets job and the distill job (the codecs it stores are
trainer/method/codecs/): the header (what determines a
set), the WebDataset shard format and its manifest, a set's checked inputs, claiming a set's folder and
writing a shard, the sample order and the reader.
Never imports `jobs` or the engine.
"""
