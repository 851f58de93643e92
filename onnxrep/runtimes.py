"""Deployment runtimes: convert an ONNX model with a runtime's own tools, run it on given
inputs and compare with onnxruntime (docs/DESIGN.md, "Runtime checks").

One adapter per runtime (`RUNTIMES`, named like the targets of onnxrep/targets.py). An
adapter takes the model file, the inputs, the output names and a scratch folder, and returns
the outputs in that order and the number of layers the runtime built, where it exposes one
(constants, inputs and outputs not counted):

  onnxruntime  CPU session, graph optimizations on; layers: nodes of the optimized model
  ort-mobile   onnxruntime's convert_onnx_models_to_ort tool (optimization style Fixed),
               then a session on the .ort; layers: the .ort graph's nodes
  openvino     ov.Core().read_model / compile_model on CPU at f32 precision (the CPU
               default may be bf16); layers: the compiled runtime model's ops
  mnn          the MNN converter (its C entry point: the `mnnconvert` script would install
               and call a telemetry package), then the MNN Module API; layers: the .mnn ops
  ncnn         pnnx run in the scratch folder on a single-file copy of the model (pnnx
               resolves external data from its working folder, and writes its files there),
               fp32 weights (pnnx's default is fp16), then ncnn with fp16 storage and
               arithmetic off; ncnn has no batch axis, so each batch element runs alone
  tensorrt     only with the `tensorrt` package and a CUDA GPU (through polygraphy)
  tflite       onnx2tf and the LiteRT interpreter, where they are installed

`check` runs the adapter in a child process (`python -m onnxrep.runtimes`; one for a batch
of models, `check_many`, and a new one after a crash): the runtimes are native libraries that
may crash on a model or print to the terminal from C; a crash becomes a failed check with one
line, never a dead onnxrep. ONNXREP_<NAME>_PYTHON runs the child with another interpreter
(onnx2tf pins package versions that cannot live beside onnxrep's own).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxrep.errors import OnnxrepError, first_line
from onnxrep.io import TWO_GB
from onnxrep.io.load import tensor_bytes
from onnxrep.verify import Dims, OutputDiff, compare_outputs, random_inputs, session

Feeds = dict[str, np.ndarray]


@dataclass
class Converted:
    """What an adapter returns: the outputs (model output order) and the runtime's layers."""

    outputs: list[np.ndarray]
    layers: int | None = None


@dataclass(frozen=True)
class Runtime:
    name: str
    modules: tuple[str, ...]  # Python modules the adapter imports
    install: str  # how to get them, for the one-line error
    rtol: float  # relative L2 error against onnxruntime that still passes
    atol: float  # ... or max absolute error, for outputs near zero
    adapter: Callable[[Path, Feeds, list[str], Path], Converted]
    needs: str = ""  # what else the machine must have (a GPU), checked by `unavailable`


class RuntimeStageError(Exception):
    """The runtime failed to convert or to run the model (a property of the runtime or the
    model, not bad input)."""


# ---------------------------------------------------------------------- adapters

def _ort_session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    """onnxruntime as deployed (graph optimizations on), unlike verify.session."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        # weights beside the optimized copy, not inside it: a model past 2 GB still saves
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized.name + ".data")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_ort(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    optimized = tmp / "optimized.onnx"
    sess = _ort_session(path, optimized)
    outputs = sess.run(names, feeds)
    layers = len(onnx.load(str(optimized), load_external_data=False).graph.node)
    return Converted(outputs, layers)


def _run_ort_format(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    try:  # the tool behind `python -m onnxruntime.tools.convert_onnx_models_to_ort`
        convert_onnx_models_to_ort(path, output_dir=tmp,
                                   optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:  # noqa: BLE001 - the tool raises what onnxruntime raises
        raise RuntimeStageError(f"convert: {first_line(exc)}") from exc
    ort_file = tmp / (path.stem + ".ort")
    if not ort_file.exists():
        raise RuntimeStageError("convert: convert_onnx_models_to_ort wrote no .ort file")
    _stage("run")
    outputs = _ort_session(ort_file).run(names, feeds)
    return Converted(outputs, _ort_format_layers(ort_file))


def _ort_format_layers(ort_file: Path) -> int | None:
    """Nodes of the main graph of an .ort file (onnxruntime's own flatbuffer reader)."""
    try:
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs
    except ImportError:
        return None
    buf = ort_file.read_bytes()
    session_fb = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0)
    return int(session_fb.Model().Graph().NodesLength())


def _run_openvino(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        raise RuntimeStageError(f"convert: {first_line(exc)}") from exc
    _stage("run")
    result = compiled(feeds)
    outputs = [np.asarray(result[compiled.output(n)]) for n in names]
    ops = compiled.get_runtime_model().get_ordered_ops()
    kinds = [str(op.get_rt_info()["layerType"].astype(str)) for op in ops]
    return Converted(outputs, sum(k not in ("Input", "Output", "Const") for k in kinds))


def _mnnconvert(*args: str) -> None:
    """MNN's converter through its C entry point (`_tools`, shipped in the MNN wheel). The
    `mnnconvert` script around it imports a logger that pip-installs a telemetry SDK (and
    downgrades protobuf) and uploads usage: not something a check may do."""
    import _tools

    _tools.mnnconvert(["mnnconvert", *args])


def _run_mnn(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    import MNN.expr as F
    import MNN.nn as nn

    mnn_file = tmp / "model.mnn"
    _mnnconvert("-f", "ONNX", "--modelFile", str(path), "--MNNModel", str(mnn_file),
                "--bizCode", "onnxrep")
    if not mnn_file.exists():
        raise RuntimeStageError("convert: MNNConvert wrote no model (see its output above)")
    json_file = tmp / "model.json"
    _mnnconvert("-f", "MNN", "--modelFile", str(mnn_file), "--JsonFile", str(json_file))
    layers = _mnn_layers(json_file)
    _stage("run")
    module = nn.load_module_from_file(str(mnn_file), list(feeds), names)
    args = [F.const(np.ascontiguousarray(x), list(x.shape), F.NCHW) for x in feeds.values()]
    outputs = []
    for value in module.forward(args):
        if value.data_format == F.NC4HW4:
            value = F.convert(value, F.NCHW)
        outputs.append(np.array(value.read()))
    return Converted(outputs, layers)


def _mnn_layers(json_file: Path) -> int | None:
    """Ops of MNNConvert's JSON dump without Input and Const. The dump writes infinite
    constants as bare `inf`, which is not JSON: read as 0 (only op types are counted)."""
    if not json_file.exists():
        return None
    text = re.sub(r"(?<![\w.\"])-?(inf|nan)\b", "0", json_file.read_text())
    try:
        ops = json.loads(text).get("oplists", [])
    except ValueError:
        return None
    return sum(op.get("type") not in ("Input", "Const") for op in ops)


def _pnnx_executable() -> str:
    """The pnnx binary inside the pnnx wheel (importing the package would import torch)."""
    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeStageError("convert: the pnnx package is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "pnnx")


def _run_ncnn(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    import ncnn

    # pnnx finds external data only relative to its working folder and writes 8 files next
    # to the model: give it a copy of its own in the scratch folder, run there
    model = onnx.load(str(path))
    local = tmp / "model.onnx"
    onnx.save(model, str(local), save_as_external_data=tensor_bytes(model) >= TWO_GB,
              location="model.onnx.data")
    del model
    shapes = ",".join("[" + ",".join(str(d) for d in (1, *x.shape[1:])) + "]"
                      for x in feeds.values())
    proc = subprocess.run([_pnnx_executable(), local.name, f"inputshape={shapes}", "fp16=0"],
                          cwd=tmp, capture_output=True, text=True, check=False)
    param, weights = tmp / "model.ncnn.param", tmp / "model.ncnn.bin"
    if proc.returncode != 0 or not param.exists():
        raise RuntimeStageError(f"convert: pnnx: {_last_line(proc.stdout + proc.stderr)}")
    _stage("run")
    net = ncnn.Net()
    # fp32 throughout: ncnn's defaults store activations in fp16 where the CPU allows
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    net.opt.use_vulkan_compute = False
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise RuntimeStageError("run: ncnn cannot load pnnx's files")
    in_names, out_names = net.input_names(), net.output_names()
    batch = next(iter(feeds.values())).shape[0]
    per_output: list[list[np.ndarray]] = [[] for _ in out_names]
    for b in range(batch):
        extractor = net.create_extractor()
        for blob, x in zip(in_names, feeds.values(), strict=True):
            extractor.input(blob, ncnn.Mat(np.ascontiguousarray(x[b])))
        for k, blob in enumerate(out_names):
            status, mat = extractor.extract(blob)
            if status != 0:
                raise RuntimeStageError(f"run: ncnn extract {blob} returned {status}")
            per_output[k].append(np.array(mat).copy())
    outputs = [np.stack(o) for o in per_output]
    return Converted(outputs, _ncnn_layers(param))


def _ncnn_layers(param: Path) -> int:
    """Layers of an ncnn .param file, without Input and MemoryData (constants)."""
    lines = param.read_text().splitlines()[2:]
    return sum(bool(line.split()) and line.split()[0] not in ("Input", "MemoryData")
               for line in lines)


def _run_tensorrt(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        TrtRunner,
    )

    profile = Profile()  # symbolic dims: the engine is built for these shapes only
    for name, x in feeds.items():
        profile.add(name, x.shape, x.shape, x.shape)
    try:
        network = NetworkFromOnnxPath(str(path))
        engine = EngineFromNetwork(network, config=CreateConfig(tf32=False, profiles=[profile]))
        runner = TrtRunner(engine)
        runner.activate()
    except Exception as exc:  # noqa: BLE001 - TensorRT raises its own types
        raise RuntimeStageError(f"convert: {first_line(exc)}") from exc
    _stage("run")
    try:
        result = runner.infer(feeds)
        layers = runner.engine.num_layers
        return Converted([np.asarray(result[n]) for n in names], int(layers))
    finally:
        runner.deactivate()


def _run_tflite(path: Path, feeds: Feeds, names: list[str], tmp: Path) -> Converted:
    from ai_edge_litert.interpreter import Interpreter

    beside = Path(sys.executable).parent / "onnx2tf"  # a virtualenv not activated
    tool = str(beside) if beside.exists() else shutil.which("onnx2tf") or "onnx2tf"
    # onnx2tf calls the onnxsim executable of its environment; without it, it fails on
    # broadcasts it would otherwise have simplified
    env = dict(os.environ, PATH=os.pathsep.join((str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", ""))))
    proc = subprocess.run([tool, "-i", str(path), "-o", str(tmp / "tf"), "-kat", *feeds],
                          capture_output=True, text=True, check=False, env=env)
    tflite = tmp / "tf" / (path.stem + "_float32.tflite")
    if proc.returncode != 0 or not tflite.exists():
        raise RuntimeStageError(f"convert: onnx2tf: {_last_line(proc.stdout + proc.stderr)}")
    _stage("run")
    interpreter = Interpreter(model_path=str(tflite))
    if interpreter.get_signature_list():
        result = interpreter.get_signature_runner()(**feeds)
        outputs = [np.asarray(result[n]) for n in names]
    else:  # onnx2tf wrote no signature: tensors in graph order
        details = interpreter.get_input_details()
        for detail, x in zip(details, feeds.values(), strict=True):
            interpreter.resize_tensor_input(detail["index"], list(x.shape))
        interpreter.allocate_tensors()
        for detail, x in zip(details, feeds.values(), strict=True):
            interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        outputs = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    ops = interpreter._get_ops_details()  # noqa: SLF001 - LiteRT's only op listing
    return Converted(outputs, len(ops))


# ---------------------------------------------------------------------- the registry

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", ("onnxruntime",), "pip install onnxruntime", 1e-5, 1e-6, _run_ort),
    Runtime("ort-mobile", ("onnxruntime",), "pip install onnxruntime", 1e-5, 1e-6,
            _run_ort_format),
    Runtime("openvino", ("openvino",), "pip install 'onnxrep[openvino]'", 1e-4, 1e-5,
            _run_openvino),
    Runtime("mnn", ("MNN",), "pip install 'onnxrep[mnn]'", 1e-3, 1e-4, _run_mnn),
    Runtime("ncnn", ("ncnn", "pnnx"), "pip install 'onnxrep[ncnn]'", 1e-4, 1e-5, _run_ncnn),
    Runtime("tensorrt", ("tensorrt", "polygraphy"), "pip install tensorrt polygraphy",
            1e-3, 1e-4, _run_tensorrt, needs="a CUDA GPU"),
    Runtime("tflite", ("onnx2tf", "ai_edge_litert"),
            "pip install 'onnxrep[tflite]' in a virtualenv of its own (onnx2tf pins onnx, "
            "onnxruntime and numpy to older versions) and set ONNXREP_TFLITE_PYTHON to its "
            "python", 1e-4, 1e-5, _run_tflite),
)}


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise OnnxrepError(f"unknown runtime '{name}' (one of: {', '.join(RUNTIMES)})")
    return RUNTIMES[name]


def _has_gpu() -> bool:
    return (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()
            or shutil.which("nvidia-smi") is not None)


def interpreter(name: str) -> str:
    """The Python that runs `name`'s adapter: ONNXREP_<NAME>_PYTHON (e.g. ONNXREP_TFLITE_PYTHON)
    names one of another environment, for a runtime whose packages pin versions that cannot
    live beside onnxrep's own (onnx2tf); else this one."""
    return os.environ.get(f"ONNXREP_{name.upper().replace('-', '_')}_PYTHON") or sys.executable


def _missing_modules(modules: tuple[str, ...], python: str) -> list[str]:
    if python == sys.executable:
        return [m for m in modules if importlib.util.find_spec(m) is None]
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if " \
            "u.find_spec(m) is None))"
    try:
        proc = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True,
                              timeout=120, check=True)
    except (OSError, subprocess.SubprocessError):
        return [f"{python} (cannot run it)"]
    return proc.stdout.split()


def unavailable(name: str) -> str | None:
    """Why `name` cannot be checked on this machine (one line), or None when it can."""
    runtime = get_runtime(name)
    missing = _missing_modules(runtime.modules, interpreter(name))
    if missing:
        return f"{name} needs {', '.join(missing)}: {runtime.install}"
    if runtime.needs == "a CUDA GPU" and not _has_gpu():
        return f"skipped: {name} needs a CUDA GPU and this machine has none"
    return None


def require(name: str) -> Runtime:
    """The runtime, or an OnnxrepError (exit 2) saying how to get it."""
    reason = unavailable(name)
    if reason is not None:
        raise OnnxrepError(reason)
    return RUNTIMES[name]


# ---------------------------------------------------------------------- running and checking

@dataclass
class RuntimeCheck:
    """`model` on `runtime` against onnxruntime (graph optimizations off) on the same inputs."""

    runtime: str
    converted: bool
    ran: bool
    outputs: list[OutputDiff] = field(default_factory=list)
    layers: int | None = None
    error: str = ""  # why it did not convert or run
    input_shapes: Dims = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.ran and all(o.passed for o in self.outputs)

    @property
    def worst_rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=float("inf"))

    def render(self) -> str:
        head = f"{self.runtime}: " + ", ".join(
            f"{k} {'x'.join(map(str, v))}" for k, v in self.input_shapes.items())
        if not self.ran:
            stage = "does not run" if self.converted else "does not convert"
            return f"{head}\n  {stage}: {self.error}\nFAIL"
        lines = [head + (f"; {self.layers} layers" if self.layers is not None else "")]
        lines += [f"  {o.name}: max|err| {o.max_abs:.3g}  rel L2 {o.rel_l2:.3g}  "
                  f"{'ok' if o.passed else 'FAIL'} (tolerance rel L2 {o.rtol:g})"
                  for o in self.outputs]
        lines.append("ok" if self.passed else "FAIL")
        return "\n".join(lines)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


_STAGE_FILE: Path | None = None  # the child's progress file for the current job


def _stage(stage: str) -> None:
    """Record in the child's progress file that conversion is done and running starts."""
    if _STAGE_FILE is not None:
        _STAGE_FILE.write_text(stage)


@dataclass
class Job:
    """One model for a runtime: its file, the inputs (in graph input order), output names."""

    model: Path
    feeds: Feeds
    outputs: list[str]


Outcome = tuple[Converted | None, str, str]  # (result, stage reached, error)


def run_isolated(name: str, jobs: list[Job], timeout: float = 1800) -> list[Outcome]:
    """Run `name`'s adapter on each job in a child process (one for all the jobs, a new one
    after a crash): per job (result, stage reached, error); the stage is "convert" or "run",
    where a failure (or crash) happened."""
    outcomes: dict[int, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="onnxrep-runtime-") as tmp_name:
        tmp = Path(tmp_name)
        for k, job in enumerate(jobs):
            np.savez(tmp / f"feeds_{k}.npz", **job.feeds)
        (tmp / "jobs.json").write_text(json.dumps(
            [[str(Path(j.model).resolve()), list(j.feeds), j.outputs] for j in jobs]))
        # the child imports this very onnxrep, wherever the working folder is
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
        while len(outcomes) < len(jobs):
            first = min(set(range(len(jobs))) - set(outcomes))
            cmd = [interpreter(name), "-m", "onnxrep.runtimes", name, str(tmp), str(first)]
            try:
                proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                      timeout=timeout, check=False)
                crash = (f"crashed ({_exit_text(proc.returncode)}): "
                         f"{_last_line(proc.stderr + proc.stdout)}")
            except subprocess.TimeoutExpired:
                crash = f"timed out after {timeout:g} s"
            for k in range(first, len(jobs)):
                stage = _read(tmp / f"stage_{k}")
                if not stage:  # not reached: a new child goes on from here
                    break
                outcomes[k] = _outcome(tmp, k, stage)
                if outcomes[k] == (None, stage, ""):  # the job the child died in
                    outcomes[k] = (None, stage, crash)
                    break
            if first not in outcomes:  # died before its first job
                outcomes[first] = (None, "convert", crash)
    return [outcomes[k] for k in range(len(jobs))]


def _outcome(tmp: Path, k: int, stage: str) -> Outcome:
    if (tmp / f"result_{k}.npz").exists():
        with np.load(tmp / f"result_{k}.npz") as data:
            outputs = [data[f"out_{i}"] for i in range(len(data.files) - 1)]
            layers = int(data["layers"])
        return Converted(outputs, None if layers < 0 else layers), "run", ""
    return None, stage, _read(tmp / f"error_{k}")


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"


def check_many(models: list[str | os.PathLike], runtime: str, input_shapes: Dims | None = None,
               seed: int = 0) -> list[RuntimeCheck]:
    """Convert and run each model on `runtime` and compare each output with onnxruntime's on
    the same seeded inputs (verify.random_inputs) at the runtime's tolerance."""
    spec = require(runtime)
    jobs, expected = [], []
    for model in models:
        reference = session(Path(model))
        feeds = random_inputs(reference, input_shapes, seed)
        names = [o.name for o in reference.get_outputs()]
        expected.append(reference.run(names, feeds))
        jobs.append(Job(Path(model), feeds, names))
        del reference
    checks = []
    for job, want, (result, stage, error) in zip(jobs, expected, run_isolated(runtime, jobs),
                                                 strict=True):
        shapes = {k: list(v.shape) for k, v in job.feeds.items()}
        if result is None:
            checks.append(RuntimeCheck(runtime, stage == "run", False, error=error,
                                       input_shapes=shapes))
            continue
        # ncnn has no batch axis: same values, the reference's shape
        got = [np.asarray(o).reshape(e.shape) if np.asarray(o).size == e.size else np.asarray(o)
               for o, e in zip(result.outputs, want, strict=False)]
        if len(got) != len(want):
            checks.append(RuntimeCheck(runtime, True, False, error=f"{len(got)} outputs, "
                                       f"expected {len(want)}", input_shapes=shapes))
            continue
        diffs = compare_outputs(job.outputs, want, got, spec.rtol, spec.atol)
        checks.append(RuntimeCheck(runtime, True, True, diffs, result.layers,
                                   input_shapes=shapes))
    return checks


def check(model: str | os.PathLike, runtime: str, input_shapes: Dims | None = None,
          seed: int = 0) -> RuntimeCheck:
    """`check_many` of one model."""
    return check_many([model], runtime, input_shapes, seed)[0]


def _child(name: str, folder: str, first: str) -> int:
    """`python -m onnxrep.runtimes NAME FOLDER FIRST`: run the adapter on FOLDER/jobs.json from
    job FIRST on; for job k write FOLDER/result_k.npz (out_0.., layers) or FOLDER/error_k, and
    FOLDER/stage_k, how far it got. Each job's scratch folder is FOLDER/work_k."""
    global _STAGE_FILE
    base = Path(folder)
    jobs = json.loads((base / "jobs.json").read_text())
    for k in range(int(first), len(jobs)):
        model, order, outputs = jobs[k]
        _STAGE_FILE = base / f"stage_{k}"
        _stage("convert")
        with np.load(base / f"feeds_{k}.npz") as data:
            feeds = {name: data[name] for name in order}
        work = base / f"work_{k}"
        work.mkdir()
        try:
            converted = RUNTIMES[name].adapter(Path(model), feeds, outputs, work)
        except RuntimeStageError as exc:
            stage, _, message = str(exc).partition(": ")
            _stage(stage)
            (base / f"error_{k}").write_text(message)
            continue
        except Exception as exc:  # noqa: BLE001 - any runtime failure is the check's answer
            (base / f"error_{k}").write_text(f"{type(exc).__name__}: {first_line(exc)}")
            continue
        finally:
            shutil.rmtree(work, ignore_errors=True)
        arrays = {f"out_{i}": np.asarray(o) for i, o in enumerate(converted.outputs)}
        np.savez(base / f"result_{k}.npz", layers=np.int64(
            -1 if converted.layers is None else converted.layers), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:4]))
