"""MLflow's system metrics (CPU, memory, disk, network, and GPU with nvidia-ml-py), sent through the run's spool.

MLflow's own ``SystemMetricsMonitor`` posts straight to the server and stops for good at the first
failed request, so an outage would end system metrics for the rest of the run. This sampler uses the
same MLflow monitors and the same ``system/...`` metric names (the UI shows them in its System
Metrics tab), but logs through :class:`~medmtl.tracking.logger.RunLogger`, which spools and resends.
Without psutil (MLflow's monitors need it) there is nothing to sample and :func:`start_system_metrics`
returns ``None``.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["SystemMetricsSampler", "start_system_metrics"]

log = logging.getLogger(__name__)


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # raises without nvidia-ml-py or without a GPU
    except Exception:  # noqa: BLE001 - no GPU metrics is the normal case on CPU machines
        pass
    return monitors


class SystemMetricsSampler:
    """Background thread: sample every ``interval_s`` seconds, log one point per sample at step 0, 1, 2 ...

    Args:
        logger: where the points go (anything with ``log_metrics(metrics, step)``).
        interval_s: sampling interval in seconds.
        monitors: MLflow metric monitors (default: CPU, disk, network, GPU when present).
    """

    def __init__(self, *, logger, interval_s: float, monitors: list | None = None) -> None:
        self.logger, self.interval_s = logger, interval_s
        self.monitors = monitors if monitors is not None else _monitors()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)

    def start(self) -> "SystemMetricsSampler":
        """Start sampling; returns self."""
        self._thread.start()
        return self

    def sample(self) -> dict[str, float]:
        """Take one sample now and log it."""
        values: dict[str, float] = {}
        for m in self.monitors:
            try:
                m.collect_metrics()
                values.update({f"system/{k}": float(v) for k, v in m.aggregate_metrics().items()})
            except Exception as err:  # noqa: BLE001 - one failing probe must not end the others
                log.debug("system metric monitor %s failed: %s", type(m).__name__, err)
            finally:
                m.clear_metrics()
        if values:
            # steps from 1: MLflow links a run's step-0 metrics to a model logged in it, and system load is no model score
            self.samples += 1
            self.logger.log_metrics(values, step=self.samples)
        return values

    def stop(self) -> None:
        """Stop sampling (takes a last sample so short runs get at least one point)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=max(5.0, self.interval_s))
        if self.samples == 0:
            self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def start_system_metrics(logger, tracking) -> SystemMetricsSampler | None:
    """Start sampling for a ``TrackingConfig`` when enabled and psutil is installed; else ``None``."""
    if not tracking.system_metrics:
        return None
    try:
        import psutil  # noqa: F401 - MLflow's monitors need it
    except ImportError:
        log.info("psutil is not installed: no system metrics (pip install psutil)")
        return None
    return SystemMetricsSampler(logger=logger, interval_s=tracking.system_metrics_interval_s).start()
