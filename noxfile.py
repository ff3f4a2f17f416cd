"""nox sessions: tests (CPU suite), props (hypothesis, many examples), lint, gpu, bench, niah,
realtext, bench-cpu.

Every session installs torch==2.13.0 first (a CPU build here; a GPU machine already has its
own torch, which `--no-deps`-free installs keep as long as it satisfies torch>=2.11).
"""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (GPU tests skip without CUDA)."""
    _install(session, "test,hf")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(name="families-5.17")
def families_517(session: nox.Session) -> None:
    """Both doors on every model family (and the door and tensor-parallel tests) under
    transformers 5.17, the oldest supported version (the CPU suite runs the newest that pip
    installs)."""
    _install(session, "test,hf")
    session.install("transformers==5.17.0")
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "tests/test_families.py",
        "tests/test_transformers.py",
        "tests/test_tensor_parallel.py",
        *session.posargs,
    )


@nox.session
def props(session: nox.Session) -> None:
    """Property-based tests with many more examples; Triton kernels in the interpreter."""
    _install(session, "test,hf")
    session.env.update({"HYPOTHESIS_PROFILE": "props", "TRITON_INTERPRET": "1"})
    session.run("python", "-m", "pytest", "-q", "-k", "not slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "flexsample", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "flexsample", "tests", "bench", "noxfile.py")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU-marked tests with the machine's own torch (run on a CUDA machine)."""
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """GPU benchmarks; each writes bench/results/<name>.md (plots: `python -m bench.plot`)."""
    for script in ("mask_build", "attention", "accuracy", "ttft"):
        session.run("python", "-m", f"bench.{script}", *session.posargs)


@nox.session(venv_backend="none")
def niah(session: nox.Session) -> None:
    """GPU: train the retrieval model, then needle-in-a-haystack on it (or `-- --model PATH`
    to test a checkpoint of your own)."""
    if session.posargs:
        session.run("python", "-m", "bench.niah", *session.posargs)
        return
    out = "bench/checkpoints/retrieval"
    session.run("python", "-m", "bench.train_retrieval", "--out", out)
    # Our tokenizer's values are one token each.
    session.run(
        "python", "-m", "bench.niah", "--model", out, "--samples", "20", "--max-new-tokens", "3"
    )


@nox.session(venv_backend="none")
def realtext(session: nox.Session) -> None:
    """GPU: train the real-text judge on the installed packages' source, then evaluate every
    masking method on held-out packages (one command, < 10 min); or `-- --model PATH` to
    evaluate a checkpoint trained before (other `bench.realtext` flags pass through)."""
    if any(arg.startswith("--model") for arg in session.posargs):
        session.run("python", "-m", "bench.realtext", *session.posargs)
        return
    session.run(
        "python",
        "-m",
        "bench.realtext",
        "--train",
        "--out",
        "bench/checkpoints/realtext",
        *session.posargs,
    )


@nox.session(name="bench-cpu")
def bench_cpu(session: nox.Session) -> None:
    """CPU-sized runs of the benchmark scripts (small S), to keep them working, and plots."""
    _install(session, "test,hf,bench")
    for script in ("mask_build", "attention", "accuracy"):
        session.run("python", "-m", f"bench.{script}", "--cpu-smoke", *session.posargs)
    session.run("python", "-m", "bench.plot", "--dir", "bench/results/cpu")
