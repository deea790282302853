"""`make serve`'s Truss server on a machine without truss or a package index (bench/gpu_full_stack.sh on
a lent GPU machine): a saved truss server stands in for `truss image build-context`, and the pip install
of the server's requirements is replaced by a check that its modules import."""

import pytest
import yaml

from gemma_serve import dev_server


def test_saved_truss_server_builds_the_same_layout(tmp_path, monkeypatch):
    saved = dev_server.export_server(tmp_path / "saved")
    assert (saved / "server" / "truss_server.py").exists() and (saved / "config.yaml").exists()

    monkeypatch.setenv(dev_server.SAVED_SERVER_ENV, str(saved))
    context = dev_server.build_context(dev_server.REPO_ROOT, tmp_path / "build")
    config = yaml.safe_load((context / "config.yaml").read_text())
    own = yaml.safe_load((dev_server.REPO_ROOT / "config.yaml").read_text())
    assert config["model_metadata"] == own["model_metadata"]  # this checkout's values win
    assert config["model_module_dir"] == "model" and "requirements" in config  # truss's normalized keys stay
    app = dev_server.layout(context, tmp_path / "build")
    for path in ("main.py", "model/model.py", "data/triton/gemma_portable/model.py",
                 "packages/gemma_serve/direct.py", "config.yaml"):
        assert (app / path).exists(), path

    monkeypatch.setenv(dev_server.SKIP_REQUIREMENTS_ENV, "1")
    dev_server.install_server_requirements(context / "server")  # no pip: only the import check, which passes


def test_missing_server_requirements_are_named(tmp_path, monkeypatch):
    (tmp_path / "truss_server.py").write_text("import a_module_nobody_installed\n")
    monkeypatch.setenv(dev_server.SKIP_REQUIREMENTS_ENV, "1")
    with pytest.raises(RuntimeError, match="a_module_nobody_installed"):
        dev_server.install_server_requirements(tmp_path)


def test_a_folder_that_is_not_a_saved_server_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(dev_server.SAVED_SERVER_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="export-server"):
        dev_server.build_context(dev_server.REPO_ROOT, tmp_path / "build")
