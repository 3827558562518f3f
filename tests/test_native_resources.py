"""The CUDA kernels of minipt._C keep their registers: no kernel spills, on any architecture built.

A spilled register costs a round trip to local memory (L1, or DRAM when L1 misses)
inside the hot loop. The built extension's own resource table (``cuobjdump
--dump-resource-usage``) gives each kernel's registers and STACK, but STACK is the
whole per-thread stack frame: spill slots, plus local arrays that cannot live in
registers, plus the frames of calls that were not inlined. It cannot tell a spill
from an array the kernel needs. ptxas can: it counts spill stores and loads apart
from the frame. So each kernels/*.cu is compiled again here, for each architecture,
with the build's flags, and the test checks two things:

- the fresh cubin is what minipt._C holds (same kernels, registers, stack and shared
  memory), so ptxas's counts describe the built extension and not some other build;
- ptxas reports zero bytes of spill stores and loads for every function, so whatever
  STACK a kernel has left is its own arrays.

It is skipped where the extension was built without CUDA or where nvcc or cuobjdump
is missing. Nothing here runs a kernel: it works on a machine without a GPU.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minipt.ops._backend import native_module

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(p.name for p in KERNELS.glob("*.cu"))
# The architectures pyproject.toml builds for unless MINIPT_CUDA_ARCHITECTURES says otherwise.
ARCHS = [re.match(r"\d+", a).group() for a in os.environ.get("MINIPT_CUDA_ARCHITECTURES", "80;90").split(";") if a]
# How CMakeLists.txt compiles kernels/*.cu (CMake's Release flags, then the target's).
# A difference that changes the code shows up as a mismatch with the built extension.
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-std=c++17", "--use_fast_math", "-lineinfo", "-DMINIPT_WITH_CUDA=1"]


def find_cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton bundles (without importing Triton)."""
    nvcc = shutil.which("nvcc")
    candidates = [shutil.which("cuobjdump")]
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent / "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(str(Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


_C = native_module()
NVCC = shutil.which("nvcc")
CUOBJDUMP = find_cuobjdump()
pytestmark = [
    pytest.mark.skipif(not _C.has_cuda, reason="minipt._C was built without CUDA: there are no CUDA kernels to read"),
    pytest.mark.skipif(NVCC is None, reason="needs nvcc, whose ptxas counts spills"),
    pytest.mark.skipif(CUOBJDUMP is None, reason="needs cuobjdump (CUDA toolkit, or Triton's bundled copy)"),
]


def without_anonymous_namespace(name: str) -> str:
    """A mangled name without its anonymous namespace, whose nvcc-made name hashes the source's path."""
    m = re.search(r"(\d+)_GLOBAL__N__", name)
    return name if m is None else name[: m.start()] + name[m.end(1) + int(m.group(1)) :]


def resource_usage(binary: str) -> dict[tuple[str, str, str], dict[str, int]]:
    """{(arch, source file, kernel): {"REG": .., "STACK": .., "SHARED": .., ...}} of every cubin in `binary`."""
    text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", binary], capture_output=True, text=True, check=True)
    usage, arch, source, function = {}, None, None, None
    for line in text.stdout.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"arch = sm_(\w+)", line):
            arch = m.group(1)
        elif line.startswith("identifier = "):
            source = Path(line.split("=", 1)[1].strip()).name
        elif m := re.fullmatch(r"Function (\S+):", line):
            function = m.group(1)
        elif line.startswith("REG:") and function is not None:
            usage[arch, source, function] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


def ptxas_spills(log: str) -> dict[str, tuple[int, int, int]]:
    """{function: (stack frame, spill stores, spill loads) in bytes} from ptxas's --resource-usage report."""
    spills, function = {}, None
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            function = m.group(1)
        elif function and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills[function] = tuple(int(g) for g in m.groups())
            function = None
    return spills


def demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names (template arguments kept, parameter lists dropped) where c++filt exists."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return {n: re.sub(r"^.*::|\(.*$", "", d) for n, d in zip(names, out.splitlines())}


@pytest.fixture(scope="module")
def built():
    return resource_usage(_C.__file__)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(source, arch): (cubin path, nvcc's result)} for every kernel file and architecture, compiled side by side."""
    folder = tmp_path_factory.mktemp("cubins")

    def compile_one(source, arch):
        cubin = folder / f"{source}.sm_{arch}.cubin"
        command = [NVCC, "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "--resource-usage", f"-I{KERNELS}", "-o",
                   str(cubin), str(KERNELS / source)]
        return cubin, subprocess.run(command, capture_output=True, text=True)

    jobs = [(source, arch) for source in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(jobs, pool.map(lambda job: compile_one(*job), jobs)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", SOURCES)
def test_kernels_do_not_spill(source, arch, built, compiled):
    in_build = {f: u for (a, s, f), u in built.items() if a == arch and s == source}
    assert in_build, f"minipt._C holds no sm_{arch} code for kernels/{source}: was it built for this architecture?"

    cubin, nvcc = compiled[source, arch]
    assert nvcc.returncode == 0, f"nvcc failed on kernels/{source}:\n{nvcc.stderr}"
    fresh = {f: u for (_, _, f), u in resource_usage(str(cubin)).items()}
    fresh_by_name = {without_anonymous_namespace(f): u for f, u in fresh.items()}
    build_by_name = {without_anonymous_namespace(f): u for f, u in in_build.items()}
    fields = ("REG", "STACK", "SHARED")
    differ = sorted(
        f for f in fresh_by_name.keys() | build_by_name.keys()
        if f not in fresh_by_name or f not in build_by_name
        or any(fresh_by_name[f][k] != build_by_name[f][k] for k in fields)
    )
    assert not differ, (
        f"minipt._C's sm_{arch} code for kernels/{source} is not what the source compiles to with the build's flags "
        f"(rebuild the extension, or align NVCC_FLAGS with CMakeLists.txt); differing kernels: {differ}"
    )

    spills = ptxas_spills(nvcc.stdout + nvcc.stderr)
    assert set(fresh) <= set(spills), f"ptxas reported no spill counts for {sorted(set(fresh) - set(spills))}"
    spilling = {f: s for f, s in spills.items() if s[1] or s[2]}
    names = demangle(sorted(spilling))
    report = "\n".join(
        f"  {names[f]}: {st} B spill stores, {ld} B spill loads, {frame} B stack, {fresh[f]['REG']} registers"
        if f in fresh else f"  {names[f]}: {st} B spill stores, {ld} B spill loads, {frame} B stack"
        for f, (frame, st, ld) in sorted(spilling.items())
    )
    assert not spilling, f"{len(spilling)} of {len(spills)} functions of kernels/{source} spill on sm_{arch}:\n{report}"
