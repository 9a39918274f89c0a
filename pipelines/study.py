"""Run a study: data sets -> cells enqueued in Optuna's storage -> workers train them -> report from MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medmtl.errors import ConfigError
from medmtl.study.cells import dataset_root, default_profile, expand_cells, study_dir
from medmtl.study.queue import CellQueue, run_worker
from medmtl.study.report import Claim, compare_cells, write_report
from medmtl.study.runs import collect_results, ensure_parent_run, finish_parent, train_cell
from medmtl.study.spec import StudySpec, load_study_spec
from pipelines.train import run_training


def prepare_datasets(spec: StudySpec, spec_path: Path) -> None:
    """Synthesize and ingest every data set of the study that has ``synth`` and no manifest yet."""
    from medmtl.ingest.run import ingest
    from medmtl.synth import synthesize_exports

    for name, ds in spec.datasets.items():
        root = dataset_root(spec, spec_path, name)
        if (root / "manifest.jsonl").exists() or ds.synth is None:
            continue
        s = ds.synth
        work = root.parent / "synth"
        shutil.rmtree(work, ignore_errors=True)  # a synth interrupted half-way is written again
        res = synthesize_exports(work, n_ct=s.n_ct, n_mr=s.n_mr, seed=s.seed, relatedness=s.relatedness,
                                 ct_matrix=s.ct_matrix, mr_matrix=s.mr_matrix)
        ingest(res.export_dir, root, labels_dir=res.labels_dir, progress=False)
        print(f"data set {name}: {s.n_ct} CT + {s.n_mr} MR, relatedness {s.relatedness} -> {root}")


def run_study(spec_path: str | Path, *, workers: int = 1, storage: str | None = None, report: bool = True,
              profile: str | None = None) -> Path | None:
    """Train every unfinished cell (resuming killed ones) with ``workers`` processes, then write the report."""
    spec_path = Path(spec_path)
    spec = load_study_spec(spec_path)
    folder = study_dir(spec, spec_path)
    folder.mkdir(parents=True, exist_ok=True)
    profile = profile or default_profile()
    cells = expand_cells(spec, spec_path, profile)
    by_key = {c.key: c for c in cells}
    prepare_datasets(spec, spec_path)
    url = storage or spec.storage or f"sqlite:///{folder / 'optuna.db'}"
    queue = CellQueue(url, spec.name, heartbeat_s=spec.heartbeat_s, grace_s=spec.grace_s, max_retry=spec.max_retry)
    parent = ensure_parent_run(queue.study, cells[0].cfg, name=spec.name, kind="study")
    added = queue.enqueue({c.key: {"label": c.label} for c in cells})
    print(f"study {spec.name}: {len(cells)} cells ({profile} profile), {added} newly enqueued, storage {url}, parent run {parent}")
    started = time.perf_counter()
    if workers > 1:
        _spawn_workers(spec_path, workers, url, profile)
    else:
        def run_cell(key: str) -> float:
            if key not in by_key:
                raise ConfigError(f"cell {key} is not in {spec_path} any more (the study file changed); run it from the file that made it")
            return train_cell(by_key[key], folder, parent=parent, study=spec.name, train=run_training)

        run_worker(queue, run_cell)
    wall = time.perf_counter() - started
    print(f"study {spec.name}: workers done in {wall:.0f} s")
    if not report:
        return None
    results, missing = collect_results(cells, parent=parent)
    comps = compare_cells(results, baseline=spec.baseline, baseline_weighting=spec.reference_weighting, n_boot=spec.bootstrap)
    claims = [Claim(**c.model_dump()) for c in spec.claims]
    span = queue.wall_time(set(by_key))
    scale = (f"Profile `{profile}`: base `{spec.base}` with overrides `{' '.join([*spec.overrides, *spec.profiles.get(profile, [])])}`; "
             f"{len(cells)} cells, {len(results)} finished. Wall time of the cells, first start to last end: {span[0] / 60:.1f} min "
             f"({span[1] / 60:.1f} min of cell time summed over the workers).")
    path, head, pics = write_report(folder, title=f"Study {spec.name}", results=results, comps=comps, baseline=spec.baseline,
                                    claims=claims, notes=spec.notes + "\n\n" + scale, missing=missing, n_boot=spec.bootstrap)
    finish_parent(cells[0].cfg, parent, description=head, files=[path, *pics], complete=not missing)
    if spec.page:
        page = (spec_path.resolve().parent / spec.page).resolve()
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(path.read_text())
        for p in pics:
            shutil.copyfile(p, page.parent / p.name)
        print(f"wrote {page}")
    print(head)
    print(f"report: {path}")
    return path


def _spawn_workers(spec_path: Path, workers: int, url: str, profile: str) -> None:
    """``workers`` processes of ``medmtl study --worker``: CPU threads split between them, one GPU each when there are GPUs."""
    import torch

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = []
    for i in range(workers):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        cmd = [sys.executable, "-m", "medmtl.cli", "study", str(spec_path), "--worker", "--storage", url, "--profile", profile]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"workers exited with {codes}; a re-run resumes what they left", file=sys.stderr)
