"""Make PyPI's (CUDA-built) torch wheel import on a CPU-only machine without the nvidia-* packages.

PyPI's Linux torch wheel is built against CUDA: torch/lib/libtorch_cuda.so and friends list
libcudart, libcublas, libcudnn, libnccl, ... as NEEDED shared libraries, which the wheel's ~20
nvidia-*/cuda-* dependencies (several GB) provide. `import torch` fails when they are absent, even
though nothing CUDA is ever called on a CPU-only run.

This script writes tiny stand-in libraries for the missing ones into torch/lib (which is on the
RPATH of every torch library), so the dynamic loader is satisfied:
  - one stub per missing NEEDED library, with the same SONAME and the symbol-version nodes the torch
    libraries ask for (checked by the loader at load time);
  - every symbol the torch libraries import from it (versioned imports by version; unversioned ones
    by CUDA-library name prefix), as a function that returns 100 (= cudaErrorNoDevice) -- so
    torch.cuda.is_available() is False and device_count() is 0 -- or, for *GetErrorString/-Name, a
    pointer to a message. Imported data objects get a zeroed buffer.
Nothing in them is ever called by CPU code. Stubs are listed in torch/lib/CUDA_STUBS.txt; deleting
those files (or installing the real nvidia-* packages, whose folders come first on the RPATH) undoes
this. Needs gcc and readelf (binutils).

Usage: python make_torch_cuda_stubs.py   (with the venv's python; does not import torch)
"""
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

# Unversioned imports that belong to CUDA libraries (the rest are libc/libstdc++/Python symbols).
CUDA_PREFIX = re.compile(r"^(cu|nccl|nvshmem|nvrtc|nvtx|__cuda|__nv|cupti|nvJitLink)", re.I)
STUB_LIST = "CUDA_STUBS.txt"


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def needed(path):
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", "-W", path))


def verneed(path):
    """version name -> file (library soname) that must define it."""
    out, cur, m = {}, None, None
    for line in run("readelf", "-V", "-W", path).splitlines():
        if m := re.search(r"File: (\S+)", line):
            cur = m.group(1)
        elif (m := re.search(r"Name: (\S+)", line)) and cur:
            out[m.group(1)] = cur
    return out


def dynsyms(path):
    """(name, version or None, type, bind, undefined?) for each dynamic symbol."""
    rows = []
    for line in run("readelf", "--dyn-syms", "-W", path).splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":"):
            continue
        typ, bind, ndx, name = f[3], f[4], f[6], f[7]
        name, _, ver = name.partition("@")
        rows.append((name, ver.lstrip("@") or None, typ, bind, ndx == "UND"))
    return rows


def system_has(lib):
    try:
        return lib in run("ldconfig", "-p")
    except (OSError, subprocess.CalledProcessError):
        return False


def main():
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("torch is not installed in this Python")
    torch_dir = spec.submodule_search_locations[0]
    lib_dir = os.path.join(torch_dir, "lib")
    site = os.path.dirname(torch_dir)
    old = os.path.join(lib_dir, STUB_LIST)
    stubs_before = open(old).read().split() if os.path.exists(old) else []
    present = set(os.path.basename(p) for p in glob.glob(os.path.join(lib_dir, "*.so*"))) - set(stubs_before)
    # The libraries loaded by `import torch`: torch._C and libtorch_global_deps.so, and what they
    # need from torch/lib, transitively. (libcaffe2_nvrtc.so, which needs the driver libcuda.so.1,
    # and libtorch_cuda_linalg.so are opened only when CUDA is used.)
    objects = glob.glob(os.path.join(torch_dir, "_C*.so")) + [os.path.join(lib_dir, "libtorch_global_deps.so")]
    todo = list(objects)
    while todo:
        for lib in needed(todo.pop()):
            path = os.path.join(lib_dir, lib)
            if lib in present and path not in objects:
                objects.append(path)
                todo.append(path)
    nvidia = set(os.path.basename(p) for p in glob.glob(os.path.join(site, "nvidia", "**", "*.so*"), recursive=True))
    missing = {}
    for o in objects:
        for lib in needed(o):
            if lib not in present and lib not in nvidia and lib not in missing and not system_has(lib):
                missing[lib] = {"versions": set(), "syms": {}}
    if not missing:
        print("make_torch_cuda_stubs: no missing libraries; nothing to do")
        return

    defined, unversioned = set(), {}
    for o in objects:
        vn = verneed(o)
        for lib, info in missing.items():
            info["versions"].update(v for v, f in vn.items() if f == lib)
        for name, ver, typ, bind, und in dynsyms(o):
            if not und:
                defined.add(name)
            elif ver and vn.get(ver) in missing:
                missing[vn[ver]]["syms"][name] = (ver, typ)
            elif not ver and bind == "GLOBAL" and CUDA_PREFIX.match(name):
                unversioned[name] = typ
    # Unversioned CUDA imports: any stub in the dependency tree will do; use the first one.
    first = sorted(missing)[0]
    for name, typ in unversioned.items():
        if name not in defined and not any(name in i["syms"] for i in missing.values()):
            missing[first]["syms"][name] = (None, typ)

    with tempfile.TemporaryDirectory() as tmp:
        for lib, info in sorted(missing.items()):
            src, vmap = os.path.join(tmp, "stub.c"), os.path.join(tmp, "stub.map")
            with open(src, "w") as c:
                c.write(f"/* stand-in for {lib}: no CUDA here */\n")
                for name, (ver, typ) in sorted(info["syms"].items()):
                    if typ == "OBJECT":
                        c.write(f"char {name}[256];\n")
                    elif re.search(r"Get(Error)?(String|Name)$", name):
                        c.write(f'const char *{name}(void) {{ return "CUDA is not available (stub {lib})"; }}\n')
                    else:
                        c.write(f"long {name}(void) {{ return 100; }}\n")
            with open(vmap, "w") as m:
                by_ver = {}
                for name, (ver, _) in info["syms"].items():
                    by_ver.setdefault(ver, []).append(name)
                versions = sorted(info["versions"] | {v for v in by_ver if v})
                if versions:  # unversioned imports bind to a versioned definition too
                    by_ver.setdefault(versions[0], []).extend(by_ver.pop(None, []))
                    for ver in versions:
                        syms = "".join(f" {s};" for s in sorted(by_ver.get(ver, [])))
                        m.write(f"{ver} {{ global:{syms} }};\n")
                elif by_ver.get(None):
                    m.write("{ global:" + "".join(f" {s};" for s in sorted(by_ver[None])) + " };\n")
                else:
                    m.write("{ local: *; };\n")
            out = os.path.join(lib_dir, lib)
            subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-w", "-o", out + ".tmp", src,
                            f"-Wl,-soname,{lib}", f"-Wl,--version-script={vmap}"], check=True)
            os.replace(out + ".tmp", out)
            print(f"make_torch_cuda_stubs: {lib}: {len(info['syms'])} symbols, versions {sorted(info['versions'])}")
    with open(old, "w") as f:
        f.write("\n".join(sorted(set(stubs_before) | set(missing))) + "\n")


if __name__ == "__main__":
    main()
