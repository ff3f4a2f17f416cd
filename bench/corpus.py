"""A deterministic corpus of real Python source: the installed packages of this interpreter.

Every top-level package directory in site-packages (sorted) becomes a run of long documents:
its `.py` files in sorted order, each preceded by a header line `# file: <pkg>/<rel path>`,
cut at file boundaries once a document holds `doc_bytes`. Train and eval are split by WHOLE
package (an eval package is never trained on): the eval packages are `EVAL_PACKAGES` where
installed (sympy comes with torch, so every machine with torch has it), topped up in the
order of a hash of the name until there are enough eval bytes. Byte caps keep the build fast
on a machine with 400+ MB of source; the plan uses file sizes only, and only the chosen files
are read. `record()` gives what a result needs to be reproduced: packages with versions,
byte counts and a hash of the file list.

`python -m bench.corpus` prints the record of the default build.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sysconfig

#: Held-out packages, first choice: large, pure Python, present wherever torch is.
EVAL_PACKAGES = ("sympy",)
#: Never read: our own code (the judge must not train on what it judges) and tooling caches.
SKIP = frozenset({"flexsample", "bench", "tests", "__pycache__", "site-packages"})
HEADER = "# file: {}\n"


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Caps of the build (bytes are UTF-8 source bytes, before tokenization).

    doc_bytes: a document ends at the first file boundary at or past this size (192 KB is
        ~45K BPE-8K tokens of Python, enough for 32K-token evaluation windows).
    train_bytes / eval_bytes: caps of each split; documents past a cap are dropped in the
        order of a hash of their name, so the kept ones spread over packages.
    package_bytes: cap per training package (one huge package must not be the corpus).
    max_file_bytes: larger files (generated tables, vendored blobs) are skipped.
    min_eval_bytes: eval packages are added until they hold this much.
    only: restrict to these top-level packages (tests, small machines); None means all.
    eval_packages: first-choice held-out packages.
    """

    doc_bytes: int = 192_000
    train_bytes: int = 160_000_000
    eval_bytes: int = 12_000_000
    package_bytes: int = 40_000_000
    max_file_bytes: int = 1_000_000
    min_eval_bytes: int = 6_000_000
    only: tuple[str, ...] | None = None
    eval_packages: tuple[str, ...] = EVAL_PACKAGES


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `name` is `<package>#<index>`; `files` are (relative path, absolute path)."""

    name: str
    package: str
    files: tuple[tuple[str, str], ...]
    nbytes: int

    def text(self) -> str:
        """The document's text: each file's header line, then its source (bad UTF-8 replaced)."""
        parts = []
        for rel, path in self.files:
            with open(path, "rb") as f:
                parts.append(HEADER.format(rel) + f.read().decode("utf-8", errors="replace"))
        return "".join(parts)


@dataclasses.dataclass
class Corpus:
    """The plan: train and eval documents, and per-package facts for the record."""

    config: CorpusConfig
    roots: list[str]
    train: list[Document]
    eval: list[Document]
    packages: dict[str, dict]

    def texts(self, split: str, workers: int = 8) -> list[str]:
        """Texts of the split's documents, in order (read with a thread pool: I/O bound)."""
        docs = self.train if split == "train" else self.eval
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(Document.text, docs))

    def file_list_hash(self) -> str:
        """sha256 of every chosen (split, document, relative path, size): the corpus identity."""
        digest = hashlib.sha256()
        for split, docs in (("train", self.train), ("eval", self.eval)):
            for doc in docs:
                for rel, path in doc.files:
                    digest.update(f"{split}\0{doc.name}\0{rel}\0{os.path.getsize(path)}\n".encode())
        return digest.hexdigest()

    def record(self) -> dict:
        """JSON-able facts: caps, roots, packages (split, version, files, bytes), the hash."""
        return {
            "config": dataclasses.asdict(self.config),
            "roots": self.roots,
            "train_documents": len(self.train),
            "eval_documents": len(self.eval),
            "train_bytes": sum(d.nbytes for d in self.train),
            "eval_bytes": sum(d.nbytes for d in self.eval),
            "eval_packages": sorted({d.package for d in self.eval}),
            "file_list_sha256": self.file_list_hash(),
            "packages": self.packages,
        }


def site_packages() -> list[str]:
    """The running interpreter's site-packages directories (purelib, platlib), deduplicated."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("purelib", "platlib"):
        path = os.path.realpath(paths[key])
        if path not in roots and os.path.isdir(path):
            roots.append(path)
    return roots


def _package_files(root: str, name: str, max_file_bytes: int) -> tuple[list, int]:
    """Sorted (relative path, absolute path, size) of a package's .py files; skipped count."""
    files, skipped = [], 0
    base = os.path.join(root, name)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            size = os.path.getsize(path)
            if size > max_file_bytes:
                skipped += 1
                continue
            files.append((os.path.relpath(path, root).replace(os.sep, "/"), path, size))
    files.sort()
    return files, skipped


def _versions() -> dict[str, str]:
    """Top-level import name -> 'dist==version' (importlib.metadata; '' where unknown)."""
    import importlib.metadata as md

    out = {}
    for top, dists in md.packages_distributions().items():
        names = sorted(set(dists))
        out[top] = ", ".join(f"{d}=={_version(md, d)}" for d in names)
    return out


def _version(md, dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


def _documents(name: str, files: list, doc_bytes: int) -> list[Document]:
    """Cut a package's sorted files into documents at file boundaries."""
    docs, current, size = [], [], 0
    for rel, path, nbytes in files:
        current.append((rel, path))
        size += nbytes + len(HEADER.format(rel))
        if size >= doc_bytes:
            docs.append(Document(f"{name}#{len(docs)}", name, tuple(current), size))
            current, size = [], 0
    if current:
        docs.append(Document(f"{name}#{len(docs)}", name, tuple(current), size))
    return docs


def _hash_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _cap(docs: list[Document], limit: int) -> list[Document]:
    """Documents in hash order up to `limit` bytes, returned in name order."""
    kept, total = [], 0
    for doc in sorted(docs, key=lambda d: _hash_key(d.name)):
        if total + doc.nbytes > limit and kept:
            continue
        kept.append(doc)
        total += doc.nbytes
    return sorted(kept, key=lambda d: (d.package, int(d.name.split("#")[1])))


def build_corpus(config: CorpusConfig | None = None, roots: list[str] | None = None) -> Corpus:
    """Plan the corpus from file sizes (nothing is read yet); deterministic for a given tree."""
    config = config or CorpusConfig()
    roots = roots or site_packages()
    found: dict[str, tuple[str, list, int]] = {}
    for root in roots:
        for name in sorted(os.listdir(root)):
            if name in found or name in SKIP or "." in name or name.startswith("__"):
                continue
            if config.only is not None and name not in config.only:
                continue
            if not os.path.isdir(os.path.join(root, name)):
                continue
            files, skipped = _package_files(root, name, config.max_file_bytes)
            if files:
                found[name] = (root, files, skipped)
    if len(found) < 2:
        raise ValueError(f"need at least 2 packages with .py files, found {sorted(found)}")
    sizes = {name: sum(f[2] for f in files) for name, (_, files, _) in found.items()}

    # Eval packages: the first choices present, then by name hash, until enough bytes; always
    # at least one package left to train on.
    order = [p for p in config.eval_packages if p in found]
    order += sorted((p for p in found if p not in order), key=_hash_key)
    eval_names: list[str] = []
    for name in order:
        if sum(sizes[p] for p in eval_names) >= config.min_eval_bytes:
            break
        if len(eval_names) + 1 < len(found):
            eval_names.append(name)

    versions = _versions()
    train, held_out, packages = [], [], {}
    for name, (_, files, skipped) in found.items():
        docs = _documents(name, files, config.doc_bytes)
        split = "eval" if name in eval_names else "train"
        if split == "train":
            docs = _cap(docs, config.package_bytes)
            train += docs
        else:
            held_out += docs
        packages[name] = {
            "split": split,
            "version": versions.get(name, ""),
            "files": len(files),
            "bytes": sizes[name],
            "skipped_large_files": skipped,
        }
    train, held_out = _cap(train, config.train_bytes), _cap(held_out, config.eval_bytes)
    for name, info in packages.items():
        docs = train if info["split"] == "train" else held_out
        info["documents"] = sum(d.package == name for d in docs)
        info["used_bytes"] = sum(d.nbytes for d in docs if d.package == name)
    return Corpus(config, roots, train, held_out, packages)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="restrict to these packages")
    args = parser.parse_args(argv)
    config = CorpusConfig(only=tuple(args.only) if args.only else None)
    print(json.dumps(build_corpus(config).record(), indent=1))


if __name__ == "__main__":
    main()
