"""One measurement in a fresh process: wall time and peak RSS of one conversion job.

    python bench/measure.py MODE IN OUT     MODE: loadsave | fuse-noverify | fuse | onnxslim
Prints one JSON line {"mode", "seconds", "peak_mb"}.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """VmHWM of this process (new with exec; getrusage's maxrss is inherited from the parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    external = (src.parent / (src.name + ".data")).exists()
    start = time.perf_counter()
    if mode == "loadsave":
        import onnx

        model = onnx.load(str(src))
        if external:
            onnx.save_model(model, str(dst), save_as_external_data=True,
                            location=dst.name + ".data")
        else:
            onnx.save_model(model, str(dst))
    elif mode in ("fuse", "fuse-noverify"):
        import onnxrep

        result = onnxrep.fuse(src, verify=mode == "fuse")
        onnxrep.write(result, dst, source=src)
    elif mode == "onnxslim":
        import onnxslim

        onnxslim.slim(str(src), str(dst))
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mb": peak_mb}))


if __name__ == "__main__":
    main()
