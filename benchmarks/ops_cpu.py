"""CPU benchmark: hf-scfm's linear-time ops against transformers' own pure-PyTorch Mamba mixers.

For Mamba-1 (``transformers.models.mamba.MambaMixer``, whose CPU path loops over time steps in
Python) and Mamba-2 (``transformers.models.mamba2.Mamba2Mixer``, chunked SSD in PyTorch) this builds
the mixer with a fixed seed and runs forward + backward on a fixed input, once with transformers'
own code and once with the *same module's weights* routed through our ops (``causal_conv1d`` + ``selective_scan`` /
``ssd_scan``, beside the modeling files in ``hf_scfm/modeling/<family>/``). It prints, per length:

* CPU time (``time.process_time``; with one thread this is the wall time of an idle machine, and
  unlike wall time it does not count time spent waiting for a busy CPU) of forward+backward for
  both, and the ratio. The baseline's forward+backward gets a cap in CPU seconds (``RLIMIT_CPU``,
  set after imports and setup); past it the row says '> cap' and the speedup is a lower bound;
* peak memory of forward+backward (max RSS above the RSS before the step, ``ru_maxrss``), and the
  8192 : 1024 growth ratio (linear in length would be 8);
* max |difference| of the outputs and of the input gradients, relative to the largest value;
* achieved GFLOP/s (model FLOPs of forward+backward) against a plain float32 matmul.

Each (implementation, length) runs in its own subprocess so that peak memory is per measurement;
weights and inputs are identical across subprocesses (same seeds; outputs are compared from
safetensors files). On a shared machine even CPU times are noisy (caches, memory bandwidth).

    python benchmarks/ops_cpu.py --quick           # 1024 and 2048, a few minutes on 2 cores
    python benchmarks/ops_cpu.py                   # 1024 / 2048 / 4096 / 8192
    python benchmarks/ops_cpu.py --d-model 512 --cap 300 --threads 2
"""

from __future__ import annotations

import os
import sys


import argparse
import json
import resource
import subprocess
import tempfile
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_mixer(family: str, d_model: int, d_state: int, chunk_size: int):
    torch.manual_seed(0)
    if family == "mamba1":
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        cfg = MambaConfig(hidden_size=d_model, state_size=d_state, expand=2, num_hidden_layers=1)
        return MambaMixer(cfg, layer_idx=0)
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    head_dim = 64
    cfg = Mamba2Config(
        hidden_size=d_model, state_size=d_state, expand=2, head_dim=head_dim, num_heads=2 * d_model // head_dim,
        n_groups=1, chunk_size=chunk_size, num_hidden_layers=1,
    )
    return Mamba2Mixer(cfg, layer_idx=0)


def ours_mamba1(m, hidden):
    """MambaMixer's computation with hf_scfm ops (same weights)."""
    from hf_scfm.modeling.mouse_genemamba.conv import causal_conv1d
    from hf_scfm.modeling.mouse_genemamba.selective_scan import selective_scan

    x, gate = m.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    x = causal_conv1d(x, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu", backend="torch")
    dt, B, C = m.x_proj(x.transpose(1, 2)).split([m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
    dt = m.dt_proj.weight @ dt.transpose(1, 2)
    y = selective_scan(
        x, dt, -torch.exp(m.A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D=m.D.float(), z=gate,
        delta_bias=m.dt_proj.bias.float(), delta_softplus=True, backend="torch",
    )
    return m.out_proj(y.transpose(1, 2))


def ours_mamba2(m, hidden):
    """Mamba2Mixer's computation with hf_scfm ops (same weights)."""
    from hf_scfm.modeling.scmamba2.conv import causal_conv1d
    from hf_scfm.modeling.scmamba2.ssd import ssd_scan

    b, L, _ = hidden.shape
    gate, xbc, dt = m.in_proj(hidden).split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
    xbc = causal_conv1d(xbc.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias, "silu", backend="torch")
    gn = m.n_groups * m.ssm_state_size
    x, B, C = xbc.transpose(1, 2).split([m.intermediate_size, gn, gn], dim=-1)
    y = ssd_scan(
        x.reshape(b, L, m.num_heads, m.head_dim), dt, -torch.exp(m.A_log.float()),
        B.reshape(b, L, m.n_groups, m.ssm_state_size), C.reshape(b, L, m.n_groups, m.ssm_state_size),
        m.chunk_size, D=m.D, dt_bias=m.dt_bias, dt_softplus=True, backend="torch",
    )
    return m.out_proj(m.norm(y.reshape(b, L, -1), gate))


def model_flops(family: str, m, batch: int, length: int) -> float:
    """Useful FLOPs of forward + backward (backward counted as 2x forward)."""
    T = batch * length
    D, d = m.intermediate_size, m.hidden_size
    N, W = m.ssm_state_size, m.conv_kernel_size
    if family == "mamba1":
        R = m.time_step_rank
        fwd = 2 * T * (d * 2 * D + D * (R + 2 * N) + R * D + D * d + D * W) + 8 * T * D * N
    else:
        H, P, G, Tc = m.num_heads, m.head_dim, m.n_groups, min(m.chunk_size, length)
        conv_dim = m.conv_dim
        fwd = 2 * T * (d * (D + conv_dim + H) + conv_dim * W + D * d)
        fwd += 2 * T * Tc * G * N + T * Tc * H + 2 * T * Tc * H * P + 4 * T * H * P * N
    return 3.0 * fwd


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    m = build_mixer(args.family, args.d_model, args.d_state, args.chunk_size)
    m.train()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.batch, args.length, args.d_model, generator=g).requires_grad_()
    weight = torch.randn(args.batch, args.length, args.d_model, generator=g)
    if args.impl == "ours":
        ours = {"mamba1": ours_mamba1, "mamba2": ours_mamba2}[args.family]

        def fn(h):
            return ours(m, h)
    else:
        fn = m

    def step():
        m.zero_grad(set_to_none=True)
        hidden.grad = None
        start = time.process_time()
        out = fn(hidden)
        (out * weight).sum().backward()
        return out, time.process_time() - start

    if args.cpu_cap:  # the cap counts the forward+backward only (not imports and setup)
        used = resource.getrusage(resource.RUSAGE_SELF)
        limit = int(used.ru_utime + used.ru_stime + args.cpu_cap) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))
    rss0 = _rss_bytes()
    out, seconds = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    if args.impl == "ours" and args.repeat > 1:  # cheap: take the best of a few
        seconds = min([seconds] + [step()[1] for _ in range(args.repeat - 1)])
    from safetensors.torch import save_file

    save_file({"out": out.detach().contiguous(), "grad": hidden.grad.contiguous()}, args.out)
    flops = model_flops(args.family, m, args.batch, args.length)
    print(json.dumps({"seconds": seconds, "peak_bytes": max(peak, 0), "flops": flops}))


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, n = time.process_time(), 0
    while time.process_time() - start < 1.0:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.process_time() - start) / 1e9


def run_worker(args, family, impl, length, out, timeout):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--family", family, "--impl", impl,
        "--length", str(length), "--out", out, "--d-model", str(args.d_model), "--batch", str(args.batch),
        "--threads", str(args.threads), "--chunk-size", str(args.chunk_size), "--repeat", str(args.repeat),
        "--d-state", str(args.d_state[family]),
    ]
    if timeout is not None:
        cmd += ["--cpu-cap", str(timeout)]
    try:  # wall-clock backstop: a CPU-starved machine should not hang the benchmark forever
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=None if timeout is None else 10 * timeout)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        if timeout is not None and res.returncode in (-9, -24, 137, 152):  # SIGKILL / SIGXCPU
            return None
        raise RuntimeError(f"{family}/{impl}/{length} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="lengths 1024 and 2048 only")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--families", nargs="+", default=["mamba1", "mamba2"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256, help="Mamba-2 chunk size (both implementations)")
    p.add_argument("--cap", type=float, default=120.0, help="CPU-seconds cap for one baseline run")
    p.add_argument("--repeat", type=int, default=2, help="best of N for our (fast) implementation")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--d-state", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpu-cap", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.d_state = {"mamba1": 16, "mamba2": 64}
    lengths = [n for n in args.lengths if n <= 2048] if args.quick else args.lengths
    peak_mm = matmul_gflops(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, d_model {args.d_model} "
          f"(d_inner {2 * args.d_model}); Mamba-1 d_state 16; Mamba-2 d_state 64, head_dim 64, chunk {args.chunk_size}")
    print(f"# plain float32 matmul (1024^3): {peak_mm:.1f} GFLOP/s; baseline cap {args.cap:.0f} s; "
          "times are CPU seconds of one forward+backward; shared machine: noisy")
    header = (f"{'family':7} {'L':>5} | {'transformers s':>14} {'ours s':>7} {'speedup':>8} | "
              f"{'peak MB tf':>10} {'peak MB ours':>12} | {'max|dy| rel':>11} {'max|dx| rel':>11} | "
              f"{'GFLOP/s':>7} {'% matmul':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            print(header)
            capped, ours_peaks = False, {}
            for length in lengths:
                f_ours, f_tf = os.path.join(tmp, "ours.safetensors"), os.path.join(tmp, "tf.safetensors")
                ours = run_worker(args, family, "ours", length, f_ours, timeout=None)
                tf = None if capped else run_worker(args, family, "transformers", length, f_tf, timeout=args.cap)
                capped = capped or tf is None
                ours_peaks[length] = ours["peak_bytes"]
                gflops = ours["flops"] / ours["seconds"] / 1e9
                if tf is None:
                    tf_s, speed, tf_mb, dy, dx = f"> {args.cap:.0f}", f"> {args.cap / ours['seconds']:.1f}x", "-", "-", "-"
                else:
                    from safetensors.torch import load_file

                    a, b = load_file(f_ours), load_file(f_tf)
                    dy = f"{((a['out'] - b['out']).abs().max() / b['out'].abs().max()).item():.1e}"
                    dx = f"{((a['grad'] - b['grad']).abs().max() / b['grad'].abs().max()).item():.1e}"
                    tf_s, speed = f"{tf['seconds']:.2f}", f"{tf['seconds'] / ours['seconds']:.1f}x"
                    tf_mb = f"{tf['peak_bytes'] / 2**20:.0f}"
                print(f"{family:7} {length:>5} | {tf_s:>14} {ours['seconds']:>7.2f} {speed:>8} | "
                      f"{tf_mb:>10} {ours['peak_bytes'] / 2**20:>12.0f} | {dy:>11} {dx:>11} | "
                      f"{gflops:>7.2f} {100 * gflops / peak_mm:>7.1f}%")
            lo, hi = min(ours_peaks), max(ours_peaks)
            if hi > lo and ours_peaks[lo] > 0:
                print(f"# {family}: our peak memory {hi}:{lo} = {ours_peaks[hi] / ours_peaks[lo]:.2f} "
                      f"(length ratio {hi / lo:.0f})")


if __name__ == "__main__":
    main()
