"""Encoder backends: torch fp32 (reference), torch bf16, ONNX Runtime fp32 and int8."""
import logging

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from captioner import backends, machine
from captioner.backends import FEATURE_TOLERANCE, feature_tolerance, load_backend
from captioner.cli import main
from captioner.encoder import load_encoder
from captioner.export import onnx_file, weights_hash
from captioner.images import load_image, preprocess
from captioner.inference import Captioner


@pytest.fixture(scope="module")
def pixels(photos):
    return torch.stack([preprocess(load_image(img)) for img in photos.values()])


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def relative_error(features, reference):
    """Per image |f - ref| / |ref| (over a pooled vector, or a whole map), the worst image's."""
    diff, ref = (features - reference).flatten(1), reference.flatten(1)
    return (diff.norm(dim=1) / ref.norm(dim=1)).max().item()


@pytest.mark.parametrize("backend", ["torch", "torch-bf16", "onnx", "onnx-int8"])
def test_features_match_fp32_within_tolerance(backend, encoder, pixels, onnx_cache):
    with torch.no_grad():
        reference, reference_maps = encoder.forward_maps(pixels)
        encode = load_backend(encoder, backend, cache_dir=onnx_cache)
        features, maps = encode(pixels)
        # The classifier on these features still sees what fp32 sees (the concepts depend on
        # it); int8 on a CPU whose int8 products saturate (no VNNI) may miss one photo of four.
        agree = (encoder._fc(features).argmax(1) == encoder._fc(reference).argmax(1)).float().mean().item()
        assert agree == 1.0 or (feature_tolerance(backend) > FEATURE_TOLERANCE[backend] and agree >= 0.75)
    assert encode.name == backend
    assert features.shape == reference.shape == (len(pixels), 1280) and features.dtype == torch.float32
    assert maps.shape == reference_maps.shape == (len(pixels), 49, 1280) and maps.dtype == torch.float32
    assert relative_error(features, reference) <= feature_tolerance(backend)
    assert relative_error(maps, reference_maps) <= feature_tolerance(backend)
    assert relative_error(reference_maps.mean(1), encoder(pixels)) < 1e-5  # the pooled vector: the maps' mean


def test_auto_picks_per_machine_and_falls_back(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backends, "CIDER_VS_FP32", {"torch": 1.0, "torch-bf16": 1.0, "onnx": 1.0, "onnx-int8": 1.0})
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    assert backends.choose_backend(cpu) == "onnx"
    assert backends.choose_backend(gpu) == "torch"  # the GPU path stays torch
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)  # ONNX Runtime not installed
    assert backends.choose_backend(cpu) == "torch-bf16"
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slow: never
    assert backends.choose_backend(cpu) == "torch"
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    assert backends.choose_backend(cpu) == "onnx"


def test_auto_never_picks_a_backend_that_costs_quality(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    assert backends.CIDER_VS_FP32["onnx-int8"] < backends.MIN_CIDER_RATIO  # as measured: int8 is opt-in
    monkeypatch.setattr(backends, "CIDER_VS_FP32", {"torch": 1.0, "torch-bf16": 1.0, "onnx": 0.98, "onnx-int8": 1.0})
    assert backends.choose_backend(cpu) == "torch-bf16"
    monkeypatch.setattr(backends, "CIDER_VS_FP32", {"torch": 1.0, "torch-bf16": 0.9, "onnx": 0.98, "onnx-int8": 1.0})
    assert backends.choose_backend(cpu) == "onnx-int8"
    monkeypatch.setattr(backends, "CIDER_VS_FP32", {"torch": 1.0, "torch-bf16": 0.9, "onnx": 0.98, "onnx-int8": 0.95})
    assert backends.choose_backend(cpu) == "torch"


def test_auto_logs_its_choice(caplog, encoder, onnx_cache):
    with caplog.at_level(logging.INFO, logger="captioner.backends"):
        encode = load_backend(encoder, "auto", cache_dir=onnx_cache)
    assert f"encoder backend: {encode.name}" in caplog.text


def test_bad_backend_requests_are_clear_errors(encoder, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(encoder, "tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_backend(encoder, "onnx", device=torch.device("cuda"))
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    with pytest.raises(ValueError, match="needs onnxruntime"):
        load_backend(encoder, "onnx")


def test_tuned_encoder_gets_its_own_export(tmp_path, encoder, pixels):
    default_file = onnx_file(encoder, tmp_path)
    tuned = load_encoder()
    with torch.no_grad():
        tuned._blocks[3]._project_conv.weight.mul_(1.1)  # as a fine-tuning run would change it
    assert weights_hash(tuned) != weights_hash(encoder)
    tuned_file = onnx_file(tuned, tmp_path)
    assert tuned_file != default_file and tuned_file.read_bytes() != default_file.read_bytes()
    with torch.no_grad():
        features = load_backend(tuned, "onnx", cache_dir=tmp_path)(pixels)[0]
        assert relative_error(features, tuned(pixels)) <= FEATURE_TOLERANCE["onnx"]
        assert relative_error(features, encoder(pixels)) > 1e-3  # not the default's features
    assert onnx_file(encoder, tmp_path) == default_file  # cached, not exported again


def test_corrupt_cached_onnx_is_rebuilt(tmp_path, encoder, pixels, caplog):
    path = onnx_file(encoder, tmp_path)
    path.write_bytes(path.read_bytes()[:1000])  # a crash or a full disk mid-copy
    with caplog.at_level(logging.WARNING):
        encode = load_backend(encoder, "onnx", cache_dir=tmp_path)
    assert "exporting it again" in caplog.text
    with torch.no_grad():
        assert relative_error(encode(pixels)[0], encoder(pixels)) <= FEATURE_TOLERANCE["onnx"]


def test_export_command(tmp_path, photo_files, trained_checkpoint, pixels, trained_model):
    fp32, int8 = tmp_path / "enc.onnx", tmp_path / "enc-int8.onnx"
    for args in (["--out", fp32], ["--out", int8, "--int8", "--calibration", photo_files]):
        result = CliRunner().invoke(main, ["export", "--weights", str(trained_checkpoint), *map(str, args)])
        assert result.exit_code == 0, result.output
        assert "wrote" in result.output
    with torch.no_grad():
        reference, reference_maps = trained_model.encode_images(pixels)
    for path, backend in ((fp32, "onnx"), (int8, "onnx-int8")):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["pixels"]
        assert [o.name for o in session.get_outputs()] == ["features", "spatial"]
        features, maps = map(torch.from_numpy, session.run(None, {"pixels": pixels.numpy()}))
        assert relative_error(features, reference) <= feature_tolerance(backend)
        assert relative_error(maps, reference_maps) <= feature_tolerance(backend)
    empty = tmp_path / "no-photos"
    empty.mkdir()
    result = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "x.onnx"), "--int8",
                                       "--calibration", str(empty)])
    assert result.exit_code == 1 and "calibration needs photos" in result.output


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "torch-bf16"])
def test_captioner_on_each_backend_names_the_cat(backend, photos):
    captioner = Captioner.from_pretrained(device="cpu", backend=backend)
    assert captioner.backend == backend
    assert "cat" in captioner.caption(photos["cat"])["caption"].split()


def test_cli_backend_flag(image_folder, trained_checkpoint):
    result = CliRunner().invoke(main, ["caption", str(image_folder / "cat.jpg"), "--weights", str(trained_checkpoint),
                                       "--backend", "onnx", "--workers", "0", "--format", "txt"])
    assert result.exit_code == 0, result.output
    assert "a cat sits on the floor" in result.stdout
    result = CliRunner().invoke(main, ["caption", str(image_folder), "--backend", "tpu"])
    assert result.exit_code == 2 and "tpu" in result.output


def test_available_cores_reads_the_cgroup_quota(monkeypatch):
    real_read = machine.Path.read_text
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(machine.Path, "read_text", lambda self, *a, **k: "150000 100000\n"
                        if str(self) == "/sys/fs/cgroup/cpu.max" else real_read(self, *a, **k))
    assert machine.available_cores() == 2  # docker --cpus 1.5 on a 16-core host
    assert machine.pipeline_threads("onnx") == 1 and machine.pipeline_threads("torch-bf16") == 2
    assert machine.decoding_workers() == 1 and machine.default_server_workers() == 2


def test_tolerance_and_warning_follow_the_cpu_s_int8_and_bf16_hardware(monkeypatch, encoder, onnx_cache, caplog):
    from captioner import backends

    monkeypatch.setattr(backends, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    assert feature_tolerance("onnx-int8") == FEATURE_TOLERANCE["onnx-int8"]
    assert feature_tolerance("torch-bf16") == FEATURE_TOLERANCE["torch-bf16"]
    with caplog.at_level(logging.WARNING):
        load_backend(encoder, "onnx-int8", cache_dir=onnx_cache)
    assert "VNNI" not in caplog.text

    monkeypatch.setattr(backends, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    assert feature_tolerance("onnx-int8") > FEATURE_TOLERANCE["onnx-int8"]
    assert feature_tolerance("torch-bf16") > FEATURE_TOLERANCE["torch-bf16"]
    assert feature_tolerance("onnx") == FEATURE_TOLERANCE["onnx"]
    with caplog.at_level(logging.WARNING):
        load_backend(encoder, "onnx-int8", cache_dir=onnx_cache)
    assert "this CPU has no VNNI" in caplog.text
