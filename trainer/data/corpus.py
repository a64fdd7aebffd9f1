"""Where documents come from: local files of several formats, ``save_to_disk`` folders, the hub.

``data.paths`` (``data.source=text``) is a list of globs; each match is one of
- a plain-text file (``.txt``, ``.md``, ``.rst``, ``.py``): one document;
- ``.jsonl``: one document per non-empty line (its ``data.text_field``);
- ``.parquet``: one document per row of the ``data.text_field`` column, read in record batches with
  pyarrow (what ``datasets`` stores on the hub and converts to): never loaded whole;
- ``.arrow``: an Arrow IPC file or stream (``datasets``' own on-disk format), memory-mapped;
- a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: its ``data.hf_split``),
  opened with ``datasets.load_from_disk`` (memory-mapped, no copy).
``data.source=hf`` names a hub dataset (``data.hf_name``); it is read through ``datasets.load_dataset``
from the local cache or the hub, and fails with a message that says which, when offline.
``count_documents`` counts them before any is tokenised (metadata where the format has it).

Documents are yielded in a fixed order (the globs' order, each glob's matches sorted), so prepared
data is a function of the inputs.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from trainer.config import DataConfig
from trainer.data.errors import DataError

PLAIN_SUFFIXES = (".txt", ".md", ".rst", ".py")
RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")
_BATCH_ROWS = 1024


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``save_to_disk``: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files (and saved-dataset folders) matched by the globs, each pattern's matches sorted."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if m.is_file() or is_saved_dataset(m)]
        if not matches:
            raise DataError(f"data.paths: glob '{pattern}' matches no file or save_to_disk folder")
        for m in matches:
            if m.is_file() and m.suffix not in PLAIN_SUFFIXES + RECORD_SUFFIXES:
                raise DataError(f"data.paths: {m}: unsupported file type '{m.suffix}' (plain text "
                                f"{', '.join(PLAIN_SUFFIXES)}; records {', '.join(RECORD_SUFFIXES)}; or a "
                                "save_to_disk folder)")
            if m not in found:
                found.append(m)
    return found


def iter_text_documents(files: Sequence[Path], text_field: str, split: str = "train") -> Iterator[str]:
    """Every document of the given files/folders, in order (see the module docstring)."""
    for path in files:
        if path.is_dir():
            yield from _saved_dataset(path, text_field, split)
        elif path.suffix == ".jsonl":
            yield from jsonl_texts(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet(path, text_field)
        elif path.suffix == ".arrow":
            yield from _arrow(path, text_field)
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text: {e}") from None


def jsonl_texts(path: Path, text_field: str, key: str = "data.text_field") -> Iterator[str]:
    """The ``text_field`` of every non-empty line of a jsonl file (a corpus, LAMBADA, MAUVE's prompts);
    a bad line is a DataError naming ``path:line`` and the config ``key`` that chose the field."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{path}:{lineno}", key)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None


def _jsonl_text(line: str, text_field: str, where: str, key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: no field '{text_field}' ({key})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
    return text


def _column(names: Sequence[str], text_field: str, where: str) -> None:
    if text_field not in names:
        raise DataError(f"{where}: no column '{text_field}' (data.text_field); columns: {', '.join(names)}")


def _strings(values: list, text_field: str, where: str) -> Iterator[str]:
    for v in values:
        if not isinstance(v, str):
            raise DataError(f"{where}: column '{text_field}' holds {type(v).__name__}, not strings")
        yield v


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    _column(pf.schema_arrow.names, text_field, str(path))
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
        yield from _strings(batch.column(0).to_pylist(), text_field, str(path))


def _arrow(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except pa.ArrowInvalid:  # datasets writes the streaming format
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches, schema = iter(reader), reader.schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not an Arrow IPC file or stream: {e}") from None
    _column(schema.names, text_field, str(path))
    col = schema.get_field_index(text_field)
    for batch in batches:
        yield from _strings(batch.column(col).to_pylist(), text_field, str(path))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("this data source needs the optional 'datasets' package: install the project's "
                        "'hf' extra (pip install -e '.[hf]') or 'pip install datasets'") from None
    return datasets


def _open_saved(path: Path, split: str):
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a bad folder)
        raise DataError(f"{path}: cannot open the save_to_disk folder: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: a DatasetDict without split '{split}' (data.hf_split); splits: "
                            f"{', '.join(ds)}")
        ds = ds[split]
    return ds


def _saved_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    yield from _iter_dataset(_open_saved(path, split), text_field, str(path))


def _iter_dataset(ds, text_field: str, where: str) -> Iterator[str]:
    _column(ds.column_names, text_field, where)
    for batch in ds.select_columns([text_field]).iter(batch_size=_BATCH_ROWS):
        yield from _strings(batch[text_field], text_field, where)


def _load_hf(cfg: DataConfig):
    """(the ``data.hf_name`` dataset, from the local cache or the hub; a description of it)."""
    datasets = _datasets()
    what = (f"'{cfg.hf_name}' (config '{cfg.hf_config or 'default'}', split '{cfg.hf_split}'"
            + (f", revision '{cfg.hf_revision}')" if cfg.hf_revision else ")"))
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=cfg.hf_split,
                                   revision=cfg.hf_revision or None)
    except Exception as e:  # offline, not cached, unknown name or split, script datasets: all end here
        raise DataError(f"data.hf_name: cannot load Hugging Face dataset {what}: {type(e).__name__}: {e}. "
                        f"Without network access it must already be in the local Hugging Face cache "
                        f"(HF_HOME / HF_DATASETS_CACHE); HF_DATASETS_OFFLINE=1 reads the cache only. Local "
                        f"parquet/jsonl/arrow files or a save_to_disk folder work offline: data.source=text, "
                        f"data.paths=[...] (docs/text.md)") from None
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field: dataset {what} has no column '{cfg.text_field}' "
                        f"(columns: {', '.join(ds.column_names)})")
    return ds, what


def iter_hf_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of a Hugging Face dataset (``data.hf_name``), from the local cache or the hub."""
    ds, what = _load_hf(cfg)
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        for text in batch[cfg.text_field]:
            if not isinstance(text, str):
                raise DataError(f"data.text_field: dataset {what} has a non-string '{cfg.text_field}'")
            yield text


# --------------------------------------------------------------------------------------------------
# Counting documents (before tokenising: a holdout of the last documents needs the total, and a
# corpus that is too small should fail in seconds, not after hours of tokenising)
# --------------------------------------------------------------------------------------------------
def count_documents(cfg: DataConfig) -> int:
    """How many documents ``documents(cfg)`` yields, from metadata where the format has it
    (parquet, arrow, save_to_disk, hub datasets); a jsonl file is read once, line by line."""
    if cfg.source == "hf":
        return len(_load_hf(cfg)[0])
    return sum(_count_one(p, cfg.text_field, cfg.hf_split) for p in expand_paths(cfg.paths))


def _count_one(path: Path, text_field: str, split: str) -> int:
    if path.is_dir():
        return len(_open_saved(path, split))
    if path.suffix == ".jsonl":
        try:
            with path.open(encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())  # the lines _jsonl yields
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from None
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from None
    if path.suffix == ".arrow":
        import pyarrow as pa

        source = pa.memory_map(str(path), "r")
        try:
            try:
                reader = pa.ipc.open_file(source)
                return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                return sum(b.num_rows for b in pa.ipc.open_stream(source))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not an Arrow IPC file or stream: {e}") from None
    return 1  # a plain-text file is one document


def documents(cfg: DataConfig) -> tuple[Iterator[str], str]:
    """(the documents of a text or hf source, a one-line description of where they come from)."""
    if cfg.source == "text":
        files = expand_paths(cfg.paths)
        return iter_text_documents(files, cfg.text_field, cfg.hf_split), \
            f"text: {len(files)} inputs from {', '.join(cfg.paths)}"
    desc = f"hf: {cfg.hf_name}" + (f"/{cfg.hf_config}" if cfg.hf_config else "") + f" split {cfg.hf_split}"
    return iter_hf_documents(cfg), desc
