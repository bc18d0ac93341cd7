import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cake.demo", "-n", "8", "--layers", "4", "--hidden", "128",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # the generated text, and nothing else, on stdout
    assert "[cake" not in proc.stdout
    assert "worker-a[0-1]" in proc.stderr and "worker-b[2-3]" in proc.stderr and "workers stopped" in proc.stderr
