"""A PyTorch twin in a process of its own: `benchmarks.run` times its windows in turn with
jaxml's, so drift still hits both alike, but PyTorch never shares a process with XLA.

In one process, once XLA had compiled jaxml's step, the PyTorch twins themselves ran slower
(2 cores, 2026-12-07, each twin timed alone in a fresh process against the same twin after
jaxml's step had compiled in it: the U-Net 67 -> 97 ms, the LSTM 55 -> 76, ViT 32 -> 35,
ResNet-50 235 -> 252, ResNet-20 127 -> 133, GPT 89 -> 91, CNN 8.3 -> 8.6), while jaxml's step
hardly moved with PyTorch beside it (the U-Net 121 alone, 116 beside it; GPT 91 and 96).

Protocol (JSON lines; replies on the stdout this process started with, everything else printed
goes to stderr): first `{"family", "device", "quick", "dtype", "compiled", "keep_host_memory"}`,
answered `{"params": n}` or `{"error": "..."}`; then `{"n": steps}` per window, answered
`{"s": wall seconds, "cpu_s": this process's CPU seconds}`.
"""

import json
import os
import sys
import time


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # library prints must not reach the protocol

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    spec = json.loads(sys.stdin.readline())
    from jaxml import runtime

    runtime.keep_host_memory(spec["keep_host_memory"])  # as the benchmark's own process, before torch loads
    from benchmarks import families, torch_twins

    w = families.workload(spec["family"], spec["device"], spec["quick"], spec["dtype"])
    try:
        window, params = torch_twins.build(w, compiled=spec["compiled"], device=spec["device"])
    except Exception as e:  # torch.compile fails on some setups: the caller reports it
        reply({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})
        return
    reply({"params": params})
    for line in sys.stdin:
        n = int(json.loads(line)["n"])
        t, c = time.perf_counter(), time.process_time()
        window(n)
        reply({"s": time.perf_counter() - t, "cpu_s": time.process_time() - c})


class Twin:
    """The client: `Twin(...).window(n)` runs n steps in the worker and returns its CPU seconds."""

    def __init__(self, family: str, device: str, quick: bool, dtype: str, compiled: bool, keep_host_memory: bool):
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.torch_worker"], cwd=root,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        first = self._ask(dict(family=family, device=device, quick=quick, dtype=dtype, compiled=compiled,
                               keep_host_memory=keep_host_memory))
        if "error" in first:
            self.close()
            raise RuntimeError(first["error"])
        self.params = first["params"]

    def _ask(self, message: dict) -> dict:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the PyTorch worker exited with status {code} (its error is above, on stderr)")
        return json.loads(line)

    def window(self, n: int) -> float:
        return self._ask({"n": n})["cpu_s"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)


if __name__ == "__main__":
    main()
