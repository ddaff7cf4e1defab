"""Run sensor requests in-process: the demo and the tests drive the same flow as the daemon."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg


def evaluate_sensor(defs: dg.Definitions, name: str, instance: dg.DagsterInstance,
                    cursor: str | None = None) -> tuple[list[dg.RunRequest], str | None]:
    """One tick of sensor ``name``: its run requests and its new cursor."""
    sensor = defs.resolve_sensor_def(name)
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    result = sensor.evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


def execute_request(defs: dg.Definitions, request: dg.RunRequest,
                    instance: dg.DagsterInstance, *,
                    log_level: str | None = None) -> dg.ExecuteInProcessResult:
    """Execute a RunRequest the way the daemon would launch it (job subset, config, tags)."""
    assert request.job_name is not None
    job = defs.resolve_job_def(request.job_name)
    if request.asset_check_keys is not None or request.asset_selection is not None:
        job = job.get_subset(asset_selection=set(request.asset_selection or ()),
                             asset_check_selection=set(request.asset_check_keys or ()))
    run_config = dict(request.run_config)
    if log_level is not None:  # the console only; the instance keeps every event
        run_config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    return job.execute_in_process(run_config=run_config, instance=instance,
                                  tags=dict(request.tags), raise_on_error=False)


def execute_requests(defs: dg.Definitions, requests: Sequence[dg.RunRequest],
                     instance: dg.DagsterInstance, *,
                     log_level: str | None = None) -> list[dg.ExecuteInProcessResult]:
    return [execute_request(defs, r, instance, log_level=log_level) for r in requests]
