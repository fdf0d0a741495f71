"""bench/gpu_suite.py's dry mode (the GPU suite's code on the CPU at tiny sizes) writes the
results file every part of the suite fills: no figure is checked for speed, only that each is
there, finite and positive where it must be, and printed as recorded."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("sampling", "mfu_prior", "mfu_decoder")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ)
    # one CPU device, as on the GPU machine one device (conftest asks XLA for 8)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--dry-run",
           "--peak-tflops", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["mode"] == "dry" and "--dry-run" in r["command"] and "--peak-tflops 1" in r["command"]
    assert _positive(r["wall_s"]) and _positive(r["cpu_s"])
    assert tuple(r["parts"]) == PARTS
    for name, p in r["parts"].items():
        assert p["status"] == "ok" and p["error"] is None, (name, p.get("error"),
                                                             p.get("traceback"))
        assert p["device"]["platform"] == "cpu" and _positive(p["wall_s"])

    s = r["parts"]["sampling"]["result"]
    assert s["size"] == "fast-test" and s["dtype"] == "float32"
    for k in ("ours_s", "peer_s", "ours_images_per_s", "peer_images_per_s", "compile_s",
              "flops_per_image", "limit_s_per_image", "fraction_of_limit",
              "peer_fraction_of_limit", "ratio"):
        assert _positive(s[k]), (k, s[k])
    assert math.isclose(s["ratio"], s["ours_images_per_s"] / s["peer_images_per_s"],
                        rel_tol=1e-9)
    assert math.isclose(s["ours_images_per_s"], s["batch"] / s["ours_s"], rel_tol=1e-9)
    assert math.isclose(s["fraction_of_limit"], s["flops_per_image"] / 1e12
                        / (s["ours_s"] / s["batch"]), rel_tol=1e-9)
    assert set(s["stages_s"]) == {"text", "prior", "decoder", "super_res"}
    assert s["ours_peak_gib"] is None or _positive(s["ours_peak_gib"])  # CPU: no device stats

    for name, n_points in (("mfu_prior", 2), ("mfu_decoder", 1)):
        m = r["parts"][name]["result"]
        assert len(m["rows"]) == n_points
        for row in m["rows"]:
            for k in ("step_s", "examples_per_s", "compile_s", "model_tflops_per_step",
                      "tflops_per_s", "mfu", "n_params"):
                assert _positive(row[k]), (name, k, row[k])
            assert math.isfinite(row["loss"])
            assert math.isclose(row["mfu"], row["tflops_per_s"] / 1.0, rel_tol=1e-9)
        assert m["best"] == max(m["rows"], key=lambda row: row["examples_per_s"])
        assert m["largest_batch_ran"]["batch"] == max(row["batch"] for row in m["rows"])
        assert m["smallest_oom_batch"] is None

    md = out.with_suffix(".md").read_text()
    assert md.strip() in proc.stdout  # printed as written
    assert (f"| images/s | {s['ours_images_per_s']:.3f} | {s['peer_images_per_s']:.3f} | "
            f"{s['ratio']:.2f}x |") in md
    for name in PARTS:
        assert f"| {name} | ok |" in md
    for name in ("mfu_prior", "mfu_decoder"):
        best = r["parts"][name]["result"]["best"]
        assert f"{best['mfu']:.1%} |" in md and "**best**" in md
