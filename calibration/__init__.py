"""diffscore.calibration: real UNet inputs from the scoring workload -> INT8 Q/DQ UNet, gated on decisions.

Needs onnx and onnxruntime (onnxruntime.quantization), not torch. Entry point: `calibrate(engine_dir, ...)`
(the `diffscore calibrate` command); the pieces live in `dataset` (calibration sets), `quantize` (Q/DQ
graph) and `sensitivity` (per-layer report, decision gate, automatic float-layer choice).
"""


def __getattr__(name):  # lazy: importing the package must not pull in onnx
    if name == "calibrate":
        from diffscore.calibration.pipeline import calibrate

        return calibrate
    raise AttributeError(f"module 'diffscore.calibration' has no attribute {name!r}")
