"""Ingest throughput and memory beside dcm2niix, and what each does with the classic DICOM traps.

Run: ``python benchmarks/ingest.py`` (about a minute on 2 cores) or ``python benchmarks/ingest.py --traps``.

Prints JSON lines:

* ``ingest_setup``: the synthetic export (4 CT patients with 256^2 axial series and localizers, 4 MR patients
  with 192^2 T2 series, one oblique) and the machine.
* ``ingest_header_scan`` / ``ingest_full``: slices per second of medmtl and of the ``dcm2niix`` binary (the
  dcm2niix wheel) on the same export, medians of ``--repeats`` interleaved runs (the tool that goes first
  alternates), and ``ratio`` = medmtl / dcm2niix throughput. Header scan: medmtl reads every header,
  groups and checks the series (no pixel data); dcm2niix ``-b o`` (sidecars only, no NIfTI). Full: medmtl
  ``ingest()`` into a fresh DATA_DIR (default workers, native integer storage, ISA-L gzip level 1, every
  file fsynced) vs ``dcm2niix -z i -1 -b n`` (internal zlib, level 1, no sidecar, no fsync). medmtl runs in-process (import time excluded), dcm2niix as a process.
* ``ingest_peak_memory``: peak resident memory (VmHWM of a child process) of a full medmtl ingest with 1
  and 2 conversion workers and of dcm2niix, and medmtl's tracemalloc peak (Python and numpy allocations,
  imports excluded), for exports of 2, 4 and 8 image series; ``ingest_memory_growth`` gives the 8-over-2
  ratios (flat = about 1).
* with ``--traps``: one ``trap`` line per planted trap (small exports): medmtl's verdict and reasons,
  dcm2niix's warnings and outputs, and for each output whether every DICOM pixel lands on a voxel that holds
  its value in world coordinates (``world_ok``), computed from the DICOM headers alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medmtl.ingest.dicom_series import assemble_series, check_series, quiet_pydicom, scan_file  # noqa: E402
from medmtl.ingest.run import ingest  # noqa: E402
from medmtl.synth import synthesize_exports  # noqa: E402
from medmtl.procenv import interpreter_bin  # noqa: E402

DCM2NIIX = str(interpreter_bin() / "dcm2niix")  # the dev dependency beside this interpreter, never PATH


def emit(**kw) -> None:
    """Print one JSON line."""
    print(json.dumps(kw), flush=True)


def _files(export: Path) -> list[str]:
    return [os.path.join(r, n) for r, _, names in os.walk(export) for n in sorted(names)]


def medmtl_scan(export: Path) -> None:
    """Header phase of ingest: read every header (threads, no pixel data), group and check the series."""
    files = _files(export)
    with quiet_pydicom(), ThreadPoolExecutor(min(16, 4 * (os.cpu_count() or 1))) as pool:
        slices = [s for r in pool.map(scan_file, files) if isinstance(r, list) for s in r]
    [check_series(c) for c in assemble_series(slices)]


def dcm2niix(export: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the dcm2niix binary into a fresh ``out`` folder."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return subprocess.run([DCM2NIIX, *args, "-o", str(out), str(export)], capture_output=True, text=True, check=True)


def timed(fn) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def throughput(export: Path, work: Path, n_slices: int, repeats: int) -> None:
    """Header-scan and full-conversion slices/s of both tools: medians of interleaved runs, one JSON line each."""
    runs = {
        ("header_scan", "medmtl"): lambda: medmtl_scan(export),
        ("header_scan", "dcm2niix"): lambda: dcm2niix(export, work / "niix_scan", "-b", "o"),
        ("full", "medmtl"): lambda: (shutil.rmtree(work / "data", ignore_errors=True), ingest(export, work / "data", progress=False)),
        ("full", "dcm2niix"): lambda: dcm2niix(export, work / "niix_full", "-z", "i", "-1", "-b", "n"),
    }
    for fn in runs.values():  # warm the page cache and imports once, untimed
        fn()
    times: dict = {k: [] for k in runs}
    for r in range(repeats):
        for phase in ("header_scan", "full"):
            for tool in ("medmtl", "dcm2niix") if r % 2 == 0 else ("dcm2niix", "medmtl"):
                times[(phase, tool)].append(timed(runs[(phase, tool)]))
    for phase in ("header_scan", "full"):
        med = {tool: statistics.median(times[(phase, tool)]) for tool in ("medmtl", "dcm2niix")}
        emit(
            bench=f"ingest_{phase}", slices=n_slices, repeats=repeats,
            medmtl_slices_per_s=round(n_slices / med["medmtl"], 1),
            dcm2niix_slices_per_s=round(n_slices / med["dcm2niix"], 1),
            ratio_medmtl_over_dcm2niix=round(med["dcm2niix"] / med["medmtl"], 3),
            medmtl_s=[round(t, 3) for t in times[(phase, "medmtl")]],
            dcm2niix_s=[round(t, 3) for t in times[(phase, "dcm2niix")]],
        )


_CHILD = """
import json, sys, tracemalloc
from medmtl.ingest.run import ingest
tracemalloc.start()
ingest(sys.argv[1], sys.argv[2], progress=False, workers=int(sys.argv[3]))
print(json.dumps({"tracemalloc_peak": tracemalloc.get_traced_memory()[1]}))
"""


def _peak_rss_mb(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd``; return (its peak resident memory in MiB, its stdout).

    Read as VmHWM from /proc while it runs: ``ru_maxrss`` of a child is useless here because Linux carries
    the parent's high-water mark through fork and exec (every child would report this process's size).
    VmHWM belongs to the exec'd address space and only grows, so the last reading before exit is the peak
    up to the final 2 ms.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    status, peak_kb = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
    return peak_kb / 1024, out


def memory(synth, work: Path) -> None:
    """Peak memory of both tools on exports of 2, 4 and 8 image series (hard-linked subsets of ``synth``)."""
    ct = sorted({s.dicom_dir.parents[1] for s in synth.series if s.modality == "CT"})
    mr = sorted({s.dicom_dir.parents[1] for s in synth.series if s.modality == "MR"})
    patients = [p for pair in zip(ct, mr) for p in pair]  # CT, MR, CT, MR ... one image series each
    rows = {}
    for n in (2, 4, 8):
        sub = work / f"export{n}"
        for p in patients[:n]:
            shutil.copytree(p, sub / p.name, copy_function=os.link)  # hard links: same files, no copy
        row = {"n_series": n, "n_slices": len(_files(sub))}
        # 1 conversion worker isolates growth with the number of series; with W workers (default: one per
        # CPU) the peak is about W x the largest series, whichever series happen to convert together.
        for workers in (1, 2):
            rss, out = _peak_rss_mb([sys.executable, "-c", _CHILD, str(sub), str(work / f"mem{n}_{workers}"), str(workers)])
            row[f"medmtl_w{workers}_peak_rss_mb"] = round(rss, 1)
            row[f"medmtl_w{workers}_tracemalloc_peak_mb"] = round(json.loads(out.strip().splitlines()[-1])["tracemalloc_peak"] / 2**20, 1)
        (work / f"niix{n}").mkdir()
        row["dcm2niix_peak_rss_mb"] = round(_peak_rss_mb([DCM2NIIX, "-z", "i", "-1", "-b", "n", "-o", str(work / f"niix{n}"), str(sub)])[0], 1)
        rows[n] = row
        emit(bench="ingest_peak_memory", **row)
    emit(bench="ingest_memory_growth", n_series_from=2, n_series_to=8,
         **{k.replace("_mb", "_ratio"): round(rows[8][k] / rows[2][k], 3) for k in rows[2] if k.endswith("_mb")})


# --------------------------------------------------------------------------------------------------
# traps


def world_error(nifti: Path, groups: list[list[Path]]) -> dict:
    """Compare a converted volume with the DICOM pixels in world coordinates, from the headers alone.

    Every pixel of the best-matching group of files (one series) is located in RAS mm, the volume is sampled
    there (linear interpolation; pixels outside the volume are ignored) and compared with the rescaled
    DICOM value. ``write_series`` stores ``100 * slice + row * cols + col``, linear within a slice, so an
    exact conversion gives 0, resampling gives small errors and a slice at the wrong place errors of 100s.
    """
    from conftest_ingest import dicom_world_values
    from scipy.ndimage import map_coordinates

    img = nib.load(str(nifti))
    data = np.asanyarray(img.dataobj).astype(np.float64)
    data = data[..., 0] if data.ndim == 4 else data
    inv = np.linalg.inv(img.affine)
    best = None
    for gi, files in enumerate(groups):
        ras, vals = map(np.concatenate, zip(*(dicom_world_values(f) for f in files)))
        # Pixels on the border of a slice are left out: an interpolated output (tilt correction) mixes the
        # fill value outside the source slice into them.
        rc = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        interior = np.concatenate([_interior(int(d.Rows), int(d.Columns)) for d in rc])
        ras, vals = ras[interior], vals[interior]
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        inside = np.all((ijk > -1e-3) & (ijk < np.array(data.shape) - 1 + 1e-3), axis=1)
        if data.shape[2] == 1:  # a single slice: sample in-plane only
            inside &= np.abs(ijk[:, 2]) < 1e-3
            ijk[:, 2] = 0
        if not inside.any():
            continue
        got = map_coordinates(data, np.clip(ijk[inside], 0, np.array(data.shape) - 1).T, order=1, mode="nearest")
        row = {"series": gi, "inside": round(float(inside.mean()), 3), "max_abs_err": round(float(np.max(np.abs(got - vals[inside]))), 2)}
        if best is None or (row["inside"], -row["max_abs_err"]) > (best["inside"], -best["max_abs_err"]):
            best = row
    return best or {"series": None, "inside": 0.0, "max_abs_err": None}


def _interior(rows: int, cols: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return ((r > 0) & (r < rows - 1) & (c > 0) & (c < cols - 1)).ravel()


def traps(work: Path) -> None:
    """Plant each trap in a small export, run both tools, print what each did and how its output sits in world space."""
    sys.path.insert(0, str(ROOT / "tests" / "ingest"))
    from conftest_ingest import CORONAL, write_series
    from pydicom.uid import generate_uid

    def plant(name):  # a fresh export folder per trap
        folder = work / "traps" / name / "export"
        folder.mkdir(parents=True)
        return folder

    exports = {}  # trap -> list of series, each a list of files
    f = plant("shuffled_instance_numbers")
    exports[f.parent.name] = [write_series(f / "S", n=8, shuffle_instances=True)]
    f = plant("two_series_one_folder")
    exports[f.parent.name] = [write_series(f / "S", n=6, names=[f"A{i:03d}" for i in range(6)], seed=1),
                              write_series(f / "S", n=6, names=[f"B{i:03d}" for i in range(6)], origin=(-40.0, -30.0, 11.0), seed=2)]
    f = plant("localizer_in_series")
    uid = generate_uid()
    exports[f.parent.name] = [write_series(f / "S", n=8, series_uid=uid),
                              write_series(f / "S", n=1, series_uid=uid, iop=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                           names=["LOC"], origin=(-40.0, -27.0, 30.0))]
    f = plant("missing_slice")
    files = write_series(f / "S", n=8)
    files[4].unlink()
    exports[f.parent.name] = [files[:4] + files[5:]]
    f = plant("non_uniform_spacing")
    z = [0, 2, 4, 6, 8.8, 10.8, 12.8, 14.8]
    exports[f.parent.name] = [write_series(f / "S", positions=[(-40.0, -30.0, 10.0 + d) for d in z])]
    # Positions sheared by 15 degrees; the GantryDetectorTilt tag agrees with them in sign (dcm2niix estimates
    # -15 from these positions), disagrees, or is absent: scanners differ, and dcm2niix reads the tag.
    pos = [(-40.0, -30.0 + 2.0 * k * np.tan(np.radians(15.0)), 10.0 + 2.0 * k) for k in range(8)]
    for name, tag in (("gantry_tilt", "-15"), ("gantry_tilt_tag_sign_flipped", "15"), ("gantry_tilt_no_tag", None)):
        f = plant(name)
        exports[name] = [write_series(f / "S", positions=pos, extra={"GantryDetectorTilt": tag} if tag else None)]
    f = plant("duplicate_positions")
    exports[f.parent.name] = [write_series(f / "S", positions=[(-40.0, -30.0, 10.0 + 2.0 * k) for k in (0, 1, 2, 3, 3, 4, 5, 6)])]
    f = plant("oblique")
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    exports[f.parent.name] = [write_series(f / "S", n=8, iop=(1.0, 0.0, 0.0, 0.0, c, -s))]  # 20 degrees about x

    for name, groups in exports.items():
        export = work / "traps" / name / "export"
        data = work / "traps" / name / "data"
        report = ingest(export, data, progress=False)
        med = [
            {"status": r.status, "reasons": r.reasons, "warnings": r.warnings, "n_slices": r.n_slices, "shape": r.shape,
             **(world_error(data / r.output, groups) if r.output else {})}
            for r in report.series
        ]
        proc = dcm2niix(export, work / "traps" / name / "niix", "-z", "n", "-b", "n")
        noise = ("Chris Rorden", "Found", "Conversion required", "Compression", "Warning: Empty protocol name",
                 "Warning: Patient Position", "Warning: Unable to determine manufacturer", "Warning: Unable to append protocol")
        said = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and not ln.startswith(noise)]
        said = [ln.split(" as ")[0] + " as " + Path(ln.split(" as ")[1]).name if ln.startswith("Convert ") else ln for ln in said]
        outs = [{"file": p.name, "shape": list(nib.load(str(p)).shape), **world_error(p, groups)}
                for p in sorted((work / "traps" / name / "niix").glob("*.nii"))]
        emit(bench="trap", trap=name, medmtl=med, dcm2niix_said=said, dcm2niix_outputs=outs)


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing runs per tool and phase (medians)")
    ap.add_argument("--traps", action="store_true", help="only run the trap comparison")
    args = ap.parse_args()
    if not Path(DCM2NIIX).exists():
        sys.exit("dcm2niix not found: pip install dcm2niix")
    work = Path(tempfile.mkdtemp(prefix="medmtl-bench-ingest-"))
    try:
        version = subprocess.run([DCM2NIIX, "--version"], capture_output=True, text=True).stdout.split()[-1]
        if args.traps:
            traps(work)
            return
        t = time.perf_counter()
        synth = synthesize_exports(work / "synth", n_ct=4, n_mr=4, seed=1, ct_matrix=256, mr_matrix=192)
        n_slices = len(_files(synth.export_dir))
        emit(bench="ingest_setup", slices=n_slices, image_series=sum(not s.is_localizer for s in synth.series),
             localizers=sum(s.is_localizer for s in synth.series), synth_s=round(time.perf_counter() - t, 1),
             cpus=os.cpu_count(), dcm2niix=version, python=platform.python_version())
        throughput(synth.export_dir, work, n_slices, args.repeats)
        memory(synth, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
