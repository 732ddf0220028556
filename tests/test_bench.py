"""bench.py's derived figures (the measurements themselves are timings, which tests do not make)."""
import bench


def test_paper_grid_size_follows_the_paper_setup():
    # per ratio: baseline + contrastive = 2 x (10,000 + minority), oversampling + proposed = 2 x 20,000
    minority = [10000, 1000, 100, 50, 10]
    per_grid_epoch = sum(2 * (10000 + m) + 4 * 10000 for m in minority)
    assert bench.paper_grid_images() == per_grid_epoch * 10 * 100 == 322_320_000


def test_throughput_figures_scale_with_image_size_and_peak():
    c = {"img_size": 224, "train": {"img_per_s": 1000.0, "compute_img_per_s": 2000.0}}
    f = bench.throughput_figures(c, peak_tflops=100.0)
    assert abs(f["train_tflops"] - 10.9) < 1e-9 and abs(f["compute_fraction_of_peak"] - 0.218) < 1e-9
    assert abs(f["paper_grid_hours_at_train_rate"] - 322_320_000 / 1000 / 3600) < 1e-6
    small = bench.throughput_figures({**c, "img_size": 112}, peak_tflops=None)
    assert abs(small["train_tflops"] - 10.9 / 4) < 1e-9 and "train_fraction_of_peak" not in small


def test_one_measurement_without_its_generated_images_is_a_clear_error(tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, bench.__file__, "--measure", "train", "--img_size", "32", "--batch_size", "8",
           "--work_dir", str(tmp_path / "empty")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--work_dir {tmp_path / 'empty'} holds no generated images" in out.stderr
    out = subprocess.run(cmd[:4] + cmd[8:], capture_output=True, text=True)
    assert out.returncode == 2 and "--measure needs --img_size and --batch_size" in out.stderr
