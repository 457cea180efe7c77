import subprocess
import sys


def test_import_fastload_is_light():
    """`import fastload` must not pull torch, transformers, bitsandbytes, peft, unsloth or xformers."""
    code = ("import sys, time; t = time.perf_counter(); import fastload; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'peft', 'unsloth', 'xformers', 'trl') "
            "if m in sys.modules]; print(heavy, dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"heavy modules imported by `import fastload`: {out}"
    assert float(out[-1]) < 0.5, f"import fastload took {out[-1]} s"
