"""`interactive eval` (module `evaluation`: a module `evaluate` would shadow the function
`runtime.evaluate`): the paper's classification protocol and retrieval mAP on a labelled
collection, one row per engine.

Input: one or more index OUTDIRs (or `extract` Parquet files) of the same images, one per engine
(e.g. ORIG avg, `next`, `last`, p = 1 and 2). A row's class is the name of its path's parent
folder (`labels="folder"`) or the value of a column of the rows (`labels="COLUMN"`, a column
carried from the source). Rows are keyed by their `path` column made absolute from the current
directory (runtime/index.py `absolute_path`; relative paths meet absolute ones when eval runs
where the indexes were made, and meet each other from anywhere), so every engine gets the same
split: it is made once over the labelled paths of all the indexes
(stratified per class, fixed by a seed; or read from a split file), and the comparison uses the
paths present in all of them; the paths some index lacks (failed there, or not indexed) are
reported.

Protocol (export/ALGORITHM.md section 5 for the features): each layer's rows L2-normalised, and
the concatenation of every layer (each normalised, side by side, the whole normalised:
runtime/vectors.py `table_vectors`). Classification: a one-vs-rest linear SVM
(scikit-learn `LinearSVC`) per column, its C chosen by grid search over C_GRID with a stratified
k-fold cross-validation on the training rows only (k = min(5, the smallest class's training
rows)); ties go to the smaller C. Accuracy is the fraction of test rows classified right.
Retrieval: each test row queries the training rows by cosine similarity on the concatenation;
mAP is the mean over queries of the average precision (the relevant rows: the query's class).

Memory: every usable row's vectors of every engine, each layer and the concatenation (twice the
features' float32 size), as the SVM needs them at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from .atomic import atomic_path, write_bytes
from .index import absolute_path
from .manifest import PACKAGE
from .optional import optional_import
from .parquet import parquet_file, read_table
from .settings import INTERACTIVE_CONFIGS
from .vectors import CONCAT_COLUMN, failed_rows, feature_files, table_vectors, usable_rows
from .vectors import vector_columns as _vector_columns

FOLDER = "folder"  # labels from the parent folder's name (a column of that name needs renaming)
CONCAT = "concat"  # the table's column for all layers concatenated
MAP = "mAP"  # the table's column for retrieval mAP
TRAIN, TEST = "train", "test"
# C for L2-normalised rows: four decades, 0.01 (strong regularisation) to 100. Above that, on
# training sets the features separate (fewer rows than dimensions: liblinear's dual solver),
# the SVM is already at its hard-margin limit while the solver's iterations grow with C
# (measured on 60 rows of 856 dims: 3,000 iterations at C = 100, 10,000 and not converged at
# C = 1000); on larger sets (the primal solver) the CV's choice is reported in `chosen_c`, so
# a choice at the grid's edge shows.
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
MAX_FOLDS = 5
MIN_TRAIN = 2  # per class: the cross-validation of C needs two folds with the class in each
SVM_MAX_ITER = 10000
# mAP: similarities computed for at most this many (query, database row) pairs at a time.
MAP_BLOCK = 2**22
INSTALL = "`pip install 'interactive-features[eval]'`"
log = logging.getLogger(PACKAGE)


class EvalError(ValueError):
    """The collection cannot be evaluated as asked (labels, split, an input that is no index);
    the message names the input and the reason."""


# ------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class EngineResult:
    """One engine's row: test accuracy per layer (only this index's layers) and of the
    concatenation, retrieval mAP, and what else a reader needs to trust them."""

    name: str  # from the index's engine manifest (arch, config, p)
    index: str  # the INDEX_DIR as given
    accuracy: dict[str, float]  # layer -> fraction of test rows classified right
    concat: float
    mean_ap: float
    chosen_c: dict[str, float]  # layer (and CONCAT) -> the C the cross-validation chose
    missing: list[str]  # labelled paths of the other indexes that this one lacks
    failed: int  # rows of this index without features (failed there)


@dataclass(frozen=True)
class EvalReport:
    """The table (`rows`: one dict per engine, `columns` its keys in order) and the split it
    was measured on. `labels` and `split` hold the common paths only (what was evaluated)."""

    engines: list[EngineResult]
    layers: list[str]  # the table's layer columns (union over the engines, in network order)
    labels: dict[str, str]  # path -> class
    split: dict[str, str]  # path -> TRAIN or TEST
    split_from: dict[str, Any]  # {"seed", "test_fraction"} or {"file"}
    unlabelled: int = 0  # usable rows without a label (null column value, no parent folder)
    unsplit: int = 0  # labelled paths the split file does not list
    classes: dict[str, dict[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        counts: dict[str, dict[str, int]] = {}
        for path, label in sorted(self.labels.items(), key=lambda item: item[1]):
            counts.setdefault(label, {TRAIN: 0, TEST: 0})[self.split[path]] += 1
        object.__setattr__(self, "classes", counts)

    @property
    def columns(self) -> list[str]:
        return ["engine", "index", *self.layers, CONCAT, MAP]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per engine: engine, index, each layer's accuracy (None where the index has
        no such column), the concatenation's accuracy and mAP, as fractions."""
        return [
            {
                "engine": e.name,
                "index": e.index,
                **{layer: e.accuracy.get(layer) for layer in self.layers},
                CONCAT: e.concat,
                MAP: e.mean_ap,
            }
            for e in self.engines
        ]

    @property
    def train(self) -> int:
        return sum(1 for s in self.split.values() if s == TRAIN)

    @property
    def test(self) -> int:
        return len(self.split) - self.train

    def to_json(self) -> dict[str, Any]:
        """The table and everything around it, as JSON types."""
        return {
            "columns": self.columns,
            "rows": self.rows,
            "chosen_C": {e.name: e.chosen_c for e in self.engines},
            "classes": self.classes,
            "train": self.train,
            "test": self.test,
            "split": self.split_from,
            "missing": {e.name: e.missing for e in self.engines},
            "failed": {e.name: e.failed for e in self.engines},
            "unlabelled": self.unlabelled,
            "unsplit": self.unsplit,
            "protocol": protocol(),
        }

    def csv_text(self) -> str:
        """The table as CSV: a header of `columns`, fractions as Python writes floats (exact
        round trip), an empty cell where an index lacks a layer."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()

    def write_csv(self, target: str | os.PathLike[str]) -> Path:
        """The table as CSV into `target`, atomically."""
        return write_bytes(target, self.csv_text().encode())

    def write_split(self, target: str | os.PathLike[str]) -> Path:
        """The split as a split file (`path,split,label`), atomically: `split=` reads it back."""
        return write_split(target, self.split, self.labels)

    def format_table(self) -> str:
        """The table for a terminal: percentages, `-` where an index lacks a layer."""
        header = ["engine", *self.layers, CONCAT, MAP]
        lines = [header]
        for row in self.rows:
            cells = [row["engine"]]
            cells += ["-" if row[c] is None else f"{100 * row[c]:.1f}" for c in header[1:]]
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in lines
        )

    def summary(self) -> str:
        """One line: the classes and the split the table was measured on."""
        if "file" in self.split_from:
            how = f"split from {self.split_from['file']}"
        else:
            how = (
                f"stratified split, test fraction {self.split_from['test_fraction']}, "
                f"seed {self.split_from['seed']}"
            )
        return (
            f"{len(self.classes)} classes, {self.train} training and {self.test} test images "
            f"({how}); accuracy and mAP in %"
        )


def protocol() -> str:
    return (
        "one-vs-rest LinearSVC on L2-normalised features (each layer; all layers concatenated, "
        f"each normalised, the whole normalised), C from {list(C_GRID)} by stratified "
        f"min({MAX_FOLDS}, smallest class)-fold cross-validation on the training rows (ties to "
        "the smaller C); accuracy = fraction of test rows right; mAP: test rows query the "
        "training rows by cosine similarity on the concatenation"
    )


# ------------------------------------------------------------------------------------------------
# Reading an index


@dataclass
class _Index:
    """One index's usable rows: normalised paths, labels, each column's L2-normalised matrix
    (the layers, and CONCAT)."""

    source: str
    name: str
    layers: list[str]
    paths: list[str]
    labels: list[str | None]
    matrices: dict[str, np.ndarray]
    failed: int


def _read_index(source: str, labels: str, layers: Sequence[str] | None) -> _Index:
    try:
        columns = _vector_columns(source, layers)
    except ValueError as err:
        raise EvalError(str(err)) from None
    files = feature_files(source)
    with open(files[0], "rb") as f:
        schema = parquet_file(f).schema_arrow
    names = schema.names
    if labels != FOLDER and labels not in names:
        raise EvalError(
            f"{source}: no column {labels!r} to take labels from (--labels {FOLDER} takes the "
            f"parent folder's name); its columns: {', '.join(names)}"
        )
    per_layer = [] if columns == [CONCAT_COLUMN] else columns
    wanted = ["path", *(["status"] if "status" in names else [])]
    wanted += [labels] if labels != FOLDER and labels not in wanted else []
    wanted += [c for c in columns if c not in wanted]
    paths: list[str] = []
    row_labels: list[str | None] = []
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    failed = failed_rows(source)
    for part in files:
        table = read_table(part, columns=wanted)
        kept = usable_rows(table, columns)
        failed += table.num_rows - kept.num_rows
        part_paths = [absolute_path(p) for p in kept["path"].to_pylist()]
        paths += part_paths
        if labels == FOLDER:
            row_labels += [PurePath(p).parent.name or None for p in part_paths]
        else:
            row_labels += [None if v is None else str(v) for v in kept[labels].to_pylist()]
        for layer in per_layer:
            parts[layer].append(table_vectors(kept, [layer]))
        parts[CONCAT].append(table_vectors(kept, columns))
    matrices = {column: np.concatenate(blocks) for column, blocks in parts.items()}
    name = engine_name(schema.metadata or {}) or source
    return _Index(source, name, per_layer, paths, row_labels, matrices, failed)


def engine_name(metadata: Mapping[bytes, bytes]) -> str | None:
    """`arch config[ p=P][ fixed WxH]` from a file's `interactive.manifest` metadata (None when
    it has none)."""
    try:
        export = json.loads(metadata[b"interactive.manifest"])["export"]
        words = [str(export["arch"]), str(export["config"])]
        if export["config"] in INTERACTIVE_CONFIGS:
            words.append(f"p={export['p']}")
    except (KeyError, TypeError, ValueError):
        return None
    if export.get("fixed"):
        words.append(f"fixed {export['fixed']}")
    return " ".join(words)


def _unique_names(indexes: list[_Index]) -> None:
    """Engines that share a name (e.g. the same config with other weights) get their INDEX_DIR
    appended."""
    counts = Counter(index.name for index in indexes)
    for index in indexes:
        if counts[index.name] > 1:
            index.name = f"{index.name} ({index.source})"


# ------------------------------------------------------------------------------------------------
# Labels and the split


def _common_labels(indexes: list[_Index]) -> tuple[dict[str, str], int]:
    """path -> class over every index's labelled rows (one class per path, or EvalError), and
    how many usable rows had no label."""
    found: dict[str, str] = {}
    where: dict[str, str] = {}
    unlabelled: set[str] = set()
    for index in indexes:
        for path, label in zip(index.paths, index.labels, strict=True):
            if label is None:
                unlabelled.add(path)
                continue
            other = found.setdefault(path, label)
            where.setdefault(path, index.source)
            if other != label:
                raise EvalError(
                    f"{path}: class {other!r} in {where[path]} but {label!r} in {index.source}"
                )
    return found, len(unlabelled - found.keys())


def seeded_split(labels: Mapping[str, str], test_fraction: float, seed: int) -> dict[str, str]:
    """path -> TRAIN or TEST: in each class, round(test_fraction * n) test rows (at least one),
    the paths ordered by sha256(seed, the path relative to the paths' common folder), so the
    same collection and seed give the same split on any machine and wherever the collection
    lies. Too few images in a class for a test row and MIN_TRAIN training rows is an
    EvalError."""
    if not 0 < test_fraction < 1:
        raise EvalError(f"the test fraction must be between 0 and 1, got {test_fraction}")
    by_class: dict[str, list[str]] = defaultdict(list)
    for path, label in labels.items():
        by_class[label].append(path)
    root = os.path.commonpath(list(labels)) if len(labels) > 1 else ""
    split: dict[str, str] = {}
    for label, paths in sorted(by_class.items()):
        n_test = max(1, math.floor(test_fraction * len(paths) + 0.5))
        if len(paths) - n_test < MIN_TRAIN:
            raise EvalError(
                f"class {label!r} has {len(paths)} images: too few for a split with test "
                f"fraction {test_fraction} (each class needs at least 1 test and {MIN_TRAIN} "
                "training images)"
            )
        ordered = sorted(paths, key=lambda p: _split_key(seed, os.path.relpath(p, root or None)))
        split.update({p: TEST for p in ordered[:n_test]})
        split.update({p: TRAIN for p in ordered[n_test:]})
    return split


def _split_key(seed: int, path: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{path}".encode("utf-8", "surrogateescape")).digest()


def read_split(source: str | os.PathLike[str]) -> dict[str, str]:
    """A split file: CSV with a header naming a `path` and a `split` column (others ignored,
    e.g. `label`), `split` being train or test; paths as the indexes' `path` column holds them
    (compared after `absolute_path`, as the indexes' paths are)."""
    try:
        with open(source, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("path", "split") if c not in (reader.fieldnames or [])]
            if missing:
                raise EvalError(
                    f"{source}: a split file needs a header with `path` and `split` columns "
                    f"(missing {', '.join(missing)})"
                )
            split: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                path, side = absolute_path(row["path"] or "."), (row["split"] or "").strip()
                if side not in (TRAIN, TEST) or not row["path"]:
                    raise EvalError(
                        f"{source}, line {line}: expected a path and {TRAIN} or {TEST}, got "
                        f"{row['path']!r}, {row['split']!r}"
                    )
                if split.setdefault(path, side) != side:
                    raise EvalError(f"{source}, line {line}: {path} is both {TRAIN} and {TEST}")
    except OSError as err:
        raise EvalError(f"{source}: cannot read the split file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise EvalError(f"{source}: not a text file ({err.reason})") from None
    return split


def write_split(
    target: str | os.PathLike[str], split: Mapping[str, str], labels: Mapping[str, str]
) -> Path:
    """`split` as a split file (path,split,label, by path), atomically."""
    with atomic_path(target) as tmp, open(tmp, "w", newline="", errors="surrogateescape") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "split", "label"])
        writer.writerows((path, split[path], labels[path]) for path in sorted(split))
    return Path(target)


def _check_split(labels: Mapping[str, str], split: Mapping[str, str], source: str) -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    for path, label in labels.items():
        counts[label][split[path]] += 1
    if len(counts) < 2:
        raise EvalError(f"only one class ({', '.join(map(repr, counts))}): need at least 2")
    for label, sides in sorted(counts.items()):
        if not sides[TEST] or sides[TRAIN] < MIN_TRAIN:
            raise EvalError(
                f"class {label!r} has {sides[TRAIN]} training and {sides[TEST]} test images "
                f"({source}): each class needs at least 1 test and {MIN_TRAIN} training images"
            )


# ------------------------------------------------------------------------------------------------
# Classification and retrieval


def _sklearn() -> tuple[Any, Any]:
    needs = "interactive eval needs scikit-learn"
    svm = optional_import("sklearn.svm", needs, INSTALL)
    return svm, optional_import("sklearn.model_selection", needs, INSTALL)


def classify(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    seed: int = 0,
) -> tuple[float, float]:
    """(test accuracy, the chosen C) of a one-vs-rest LinearSVC whose C is chosen on the
    training rows only (module docstring). Labels are integer class codes."""
    svm, model_selection = _sklearn()
    folds = min(MAX_FOLDS, int(np.bincount(train_labels).min()))
    search = model_selection.GridSearchCV(
        svm.LinearSVC(dual="auto", max_iter=SVM_MAX_ITER, random_state=seed),
        {"C": list(C_GRID)},
        cv=model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="accuracy",
        error_score="raise",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        search.fit(train, train_labels)
    unconverged = sum("converge" in str(w.message) for w in caught)
    if unconverged:
        log.info("eval: LinearSVC stopped at %d iterations %d times", SVM_MAX_ITER, unconverged)
    accuracy = float(np.mean(search.predict(test) == test_labels))
    return accuracy, float(search.best_params_["C"])


def mean_average_precision(
    queries: np.ndarray,
    query_labels: np.ndarray,
    database: np.ndarray,
    database_labels: np.ndarray,
) -> float:
    """The mean over queries of the average precision of the database ranked by inner product
    (cosine for unit rows), relevant = same label; ties keep database order. Every query needs
    at least one relevant database row."""
    ranks = np.arange(1, len(database) + 1)
    block = max(1, MAP_BLOCK // max(1, len(database)))
    total = 0.0
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ database.T
        order = np.argsort(-scores, axis=1, kind="stable")
        relevant = database_labels[order] == query_labels[start : start + block, None]
        precision = np.cumsum(relevant, axis=1) / ranks
        total += float(((precision * relevant).sum(1) / relevant.sum(1)).sum())
    return total / len(queries)


# ------------------------------------------------------------------------------------------------
# The job


def evaluate(
    index_dirs: Sequence[str | os.PathLike[str]],
    labels: str = FOLDER,
    *,
    layers: Sequence[str] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    split: str | os.PathLike[str] | Mapping[str, str] | None = None,
) -> EvalReport:
    """The paper's classification accuracy (each layer, the concatenation) and retrieval mAP
    of each index (module docstring), on one split of the paths present in all of them.

    `labels`: "folder" (the parent folder's name) or a column of the rows. `layers`: the
    columns to evaluate (default every feature column of each index). `split`: a split file
    (`read_split`) or a mapping path -> "train"/"test"; without it, `seeded_split` with
    `test_fraction` and `seed` (the seed also fixes the cross-validation folds). Raises
    EvalError (the input and the reason) and MissingDependency without scikit-learn.
    """
    if not index_dirs:
        raise EvalError("no index directories given")
    _sklearn()  # before reading anything: a missing scikit-learn is the first thing to say
    indexes = []
    for source in index_dirs:
        log.info("eval: reading %s", source)
        indexes.append(_read_index(os.fspath(source), labels, layers))
    _unique_names(indexes)
    all_labels, unlabelled = _common_labels(indexes)
    if not all_labels:
        raise EvalError(f"no labelled rows in {', '.join(i.source for i in indexes)}")
    unsplit = 0
    if split is None:
        assignment = seeded_split(all_labels, test_fraction, seed)
        split_from: dict[str, Any] = {"seed": seed, "test_fraction": test_fraction}
        where = f"test fraction {test_fraction}, seed {seed}"
    else:
        given = read_split(split) if not isinstance(split, Mapping) else dict(split)
        unsplit = sum(1 for p in all_labels if p not in given)
        assignment = {p: given[p] for p in all_labels if p in given}
        where = "the split file" if isinstance(split, Mapping) else os.fspath(split)
        split_from = {"file": where}
    present = set(assignment)
    for index in indexes:
        present &= set(index.paths)
    if not present:
        raise EvalError(_nothing_in_common(indexes, assignment))
    common = {p: all_labels[p] for p in sorted(present)}
    _check_split(common, assignment, where)
    chosen = {p: assignment[p] for p in common}
    results = [_evaluate_index(index, common, chosen, assignment, seed) for index in indexes]
    order = list(dict.fromkeys(layer for index in indexes for layer in index.layers))
    return EvalReport(results, order, common, chosen, split_from, unlabelled, unsplit)


def _nothing_in_common(indexes: list[_Index], assignment: Mapping[str, str]) -> str:
    if not assignment:
        return "no labelled image is in the split file"
    examples = "; ".join(f"{i.source} has {i.paths[0]}" for i in indexes if i.paths)
    return (
        "no labelled image is in every index (rows are matched by their path made absolute "
        f"from the current directory): {examples}"
    )


def _evaluate_index(
    index: _Index,
    labels: Mapping[str, str],
    split: Mapping[str, str],
    assigned: Mapping[str, str],
    seed: int,
) -> EngineResult:
    classes = {label: code for code, label in enumerate(sorted(set(labels.values())))}
    position = {path: i for i, path in enumerate(index.paths)}
    sides = {
        side: np.array([position[p] for p in labels if split[p] == side], np.int64)
        for side in (TRAIN, TEST)
    }
    codes = {
        side: np.array([classes[labels[p]] for p in labels if split[p] == side], np.int64)
        for side in (TRAIN, TEST)
    }
    accuracy, chosen_c = {}, {}
    for column in [*index.layers, CONCAT]:
        matrix = index.matrices[column]
        log.info("eval: %s %s", index.name, column)
        accuracy[column], chosen_c[column] = classify(
            matrix[sides[TRAIN]], codes[TRAIN], matrix[sides[TEST]], codes[TEST], seed
        )
    concat = index.matrices[CONCAT]
    mean_ap = mean_average_precision(
        concat[sides[TEST]], codes[TEST], concat[sides[TRAIN]], codes[TRAIN]
    )
    mine = set(index.paths)
    missing = sorted(p for p in assigned if p not in mine)
    return EngineResult(
        name=index.name,
        index=index.source,
        accuracy={layer: accuracy[layer] for layer in index.layers},
        concat=accuracy[CONCAT],
        mean_ap=mean_ap,
        chosen_c=chosen_c,
        missing=missing,
        failed=index.failed,
    )
