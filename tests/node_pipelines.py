"""Tiny pipelines for the node's job and export tests (passed as factories, not registered).

``test-sr`` writes one highdicom Comprehensive 3D SR (TID 1500, no measurements) in the
source study.  Options: ``sleep`` (seconds, before writing), ``marker`` (a file that gets
one line per run, so a test can count runs), ``fail`` (raise a StageError), ``write``
(false: no SR, only the summary).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from pipelines.base import PipelineContext, PipelineOutput, StageError


class SrPipeline:
    name = "test-sr"
    version = "0.0.1"

    def __init__(self, options: dict[str, Any]) -> None:
        self.sleep = float(options.get("sleep", 0.0))
        self.marker = str(options.get("marker", ""))
        self.fail = bool(options.get("fail", False))
        self.write = bool(options.get("write", True))

    def run(self, ctx: PipelineContext) -> PipelineOutput:
        series = ctx.series[0]
        if self.marker:
            with open(self.marker, "a", encoding="utf-8") as f:
                f.write(f"start {os.getpid()} {series.series_uid}\n")
        if self.fail:
            raise StageError("test-sr", series.series_uid, "asked to fail")
        time.sleep(self.sleep)
        summary = {"instances": len(series.files), "predecessors": [p.sop_instance_uid for p in ctx.predecessors],
                   "extra_files": [str(p) for p in ctx.extra_files], "roles": [s.role for s in ctx.series],
                   "device": ctx.device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        if not self.write:
            return PipelineOutput(files=(), summary=summary)
        ref = pydicom.dcmread(sorted(series.files)[0], stop_before_pixels=True)
        device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), manufacturer_name=ctx.identity.manufacturer)
        observation = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                          observer_identifying_attributes=device))
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="series"),
            measurements=[hd.sr.Measurement(name=codes.DCM.InstanceNumber, value=float(len(series.files)),
                                            unit=codes.UCUM.Counts)])
        report = hd.sr.MeasurementReport(observation_context=observation,
                                         procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                         imaging_measurements=[group])
        sr = hd.sr.Comprehensive3DSR(
            evidence=[ref], content=report[0], series_number=ctx.identity.sr_series_number,
            series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer=ctx.identity.manufacturer, software_versions=ctx.identity.software_version,
            device_serial_number=ctx.identity.device_serial_number, series_description="prognode test SR",
        )
        out = Path(ctx.work_dir) / "sr.dcm"
        sr.save_as(out)
        if self.marker:
            with open(self.marker, "a", encoding="utf-8") as f:
                f.write(f"done {os.getpid()} {series.series_uid}\n")
        return PipelineOutput(files=(out,), summary=summary)


def create(options: dict[str, Any]) -> SrPipeline:
    return SrPipeline(options)


FACTORIES = {"tissue-hu": "tests.node_pipelines:create", "test-sr": "tests.node_pipelines:create"}
