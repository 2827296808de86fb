"""The CLI through typer's CliRunner: happy paths and bad inputs (one line, exit code 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.data import list_datasets
from tests import formats
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert text.count("error:") == 1, text
    error = text[text.index("error:") :]
    assert len(error.splitlines()) == 1, error  # one line, after any progress output
    for fragment in fragments:
        assert fragment in error, (fragment, error)


def _command_tree():
    """(path, command) for the app and every command and sub-command under it, from typer's own click objects."""
    import typer

    root = typer.main.get_command(app)
    found, todo = [], [((), root, typer.Context(root, info_name="ferbench"))]
    while todo:
        path, command, ctx = todo.pop(0)
        found.append((path, command))
        if hasattr(command, "list_commands"):  # a group (typer vendors click: no click.Group isinstance check)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                todo.append(((*path, name), sub, typer.Context(sub, parent=ctx, info_name=name)))
    return found


COMMAND_TREE = _command_tree()
WIDE = {"COLUMNS": "200"}  # rich folds and truncates long option names at 80 columns


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_command_tree_is_what_the_readme_documents():
    paths = {" ".join(path) for path, _ in COMMAND_TREE}
    assert {"train", "eval", "predict", "compare", "data", "leaderboard"} <= paths
    assert {"data synth", "data describe", "data verify", "data cache", "data prepare", "data list"} <= paths
    assert {"leaderboard template", "leaderboard submit", "leaderboard show"} <= paths


@pytest.mark.parametrize(("path", "command"), COMMAND_TREE, ids=[" ".join(p) or "ferbench" for p, _ in COMMAND_TREE])
def test_every_command_and_parameter_has_help_and_shows_it(path, command):
    assert (command.help or "").strip(), f"{' '.join(path) or 'ferbench'}: no help text"
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), f"{' '.join(path)} {param.opts}: no help text"
    result = runner.invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    shown = _flat(result.output)
    assert _flat(command.help.split("\n\n")[0])[:60] in shown  # the command's own summary, not a parent's
    for param in command.params:
        assert param.opts[0] in shown, (path, param.opts)
        assert _flat(param.help)[:40] in shown, (path, param.opts)
    for name in getattr(command, "commands", {}):  # a group lists each sub-command with its summary
        sub = command.commands[name]
        assert f"{name} {_flat(sub.help)[:30]}" in shown, (path, name)


@pytest.mark.parametrize(
    ("path", "options"),
    [
        (("train",), {"--set", "--resume", "--gpus"}),
        (("eval",), {"--dataset", "--root", "--cache", "--checkpoint", "--predictions", "--tta", "--perturb"}),
        (("predict",), {"--checkpoint", "--images", "--video", "--dataset", "--detector", "--align", "--overlay"}),
        (("compare",), {"--tracking-uri"}),
        (("data", "describe"), {"--dataset", "--root", "--json", "--option"}),
        (("data", "synth"), {"--out", "--size", "--n-train", "--workers"}),
    ],
)
def test_documented_options_are_there(path, options):
    command = dict(COMMAND_TREE)[path]
    have = {opt for param in command.params for opt in param.opts}
    assert options <= have, sorted(options - have)


def test_synth_and_describe_json(tmp_path):
    out = tmp_path / "sf"
    result = runner.invoke(
        app,
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--size",
            "32",
            "--n-train",
            "16",
            "--n-val",
            "8",
            "--n-test",
            "8",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "describe", "--dataset", "synthfer", "--root", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) == {"dataset", "layout", "label_space", "splits", "groups", "subsets", "dropped"}
    assert summary["splits"]["train"]["total"] == 16
    assert sum(summary["splits"]["test"]["per_label"].values()) == 8
    assert set(summary["groups"]) == {"skin_tone", "hair", "age", "glasses"}
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--size", "32"])
    _one_line_error(result, "--overwrite")
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "33"])
    _one_line_error(result, "synthfer size")


def test_train_then_eval(tiny_synthfer, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    result = runner.invoke(app, ["train", str(recipe), "--set", "optim.batch_size=32"])
    assert result.exit_code == 0, result.output
    assert "synthfer test accuracy" in result.output
    checkpoint = tmp_path / "run" / "best.pt"
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "synthfer",
            "--root",
            str(tiny_synthfer),
            "--checkpoint",
            str(checkpoint),
            "--json",
            "--out",
            str(tmp_path / "ev"),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.output[result.output.index("{") :])
    assert results["n"] == 48 and 0 <= results["metrics"]["acc"] <= 1
    assert {"skin_tone", "hair", "age", "glasses", "skin_tone+age"} <= set(results["groups"])
    assert results["ci"]["acc"][0] <= results["metrics"]["acc"] <= results["ci"]["acc"][1]
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 1000
    assert (tmp_path / "ev" / "report.md").read_text().startswith("# Evaluation: synthfer / test")
    assert results["protocol"]["name"] == "synthfer" and results["calibration"] and "ece" in results["metrics"]
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000
    eval_args = ["eval", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--checkpoint", str(checkpoint)]
    result = runner.invoke(app, [*eval_args, "--precision", "fp64", "--no-tracking"])
    _one_line_error(result, "--precision", "fp64")
    bf16 = runner.invoke(app, [*eval_args, "--precision", "bf16", "--no-tracking", "--bootstrap", "0", "--json"])
    assert bf16.exit_code == 0, bf16.output  # bf16 autocast where the device has it; recorded in the result
    assert json.loads(bf16.output[bf16.output.index("{") :])["config"]["precision"] == "bf16"
    # robustness: a seeded perturbation, with flip TTA; the drop is reported against the clean score
    args = [
        "eval",
        "--dataset",
        "synthfer",
        "--root",
        str(tiny_synthfer),
        "--checkpoint",
        str(checkpoint),
        "--perturb",
        "occlusion",
        "--tta",
        "flip",
        "--bootstrap",
        "100",
        "--out",
        str(tmp_path / "ev_occ"),
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    occluded = json.loads((tmp_path / "ev_occ" / "results.json").read_text())
    rob = occluded["robustness"]
    assert rob["perturbation"] == "occlusion" and occluded["config"]["tta"] == "flip"
    assert rob["drop"]["acc"] == rob["clean"]["acc"] - occluded["metrics"]["acc"]
    # the head metrics (ATT-COS on SynthFER's truth maps) are measured on the perturbed images too, beside the clean
    assert occluded["heads"] and set(occluded["heads"]) == set(rob["clean_heads"])
    assert occluded["heads"] != rob["clean_heads"]
    assert runner.invoke(app, [*args[:-1], str(tmp_path / "ev_occ2")]).exit_code == 0
    assert json.loads((tmp_path / "ev_occ2" / "results.json").read_text())["metrics"] == occluded["metrics"]
    assert "robustness (occlusion)" in result.output
    # compare: the training run and the eval runs from the same MLflow store, ranked, with a plot
    result = runner.invoke(
        app,
        ["compare", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--plot", str(tmp_path / "cmp.png")],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "runs ranked by test/acc" in result.output and (tmp_path / "cmp.png").stat().st_size > 1000
    # in an 80-column terminal every run name is whole and the worst gap names its group column; the plot goes
    # beside the sqlite store by default, not into the current folder
    narrow = runner.invoke(
        app, ["compare", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], env={"COLUMNS": "80"}
    )
    assert narrow.exit_code == 0, narrow.output
    table = [line for line in narrow.output.splitlines() if line[:1] in "┏┃┡│└" and line.strip()]
    assert table and max(len(line) for line in table) <= 80  # (the plot's path stays on one line, for grep)
    first_column = "".join(line.split("│")[1].strip() for line in table if line.startswith("│"))
    assert "tiny(tests)" in first_column.replace(" ", "")  # a long name folds over lines, never is cut
    assert (tmp_path / "comparison.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["data", "describe", "--dataset", "rafdbb", "--root", "."],
            ["--dataset 'rafdbb': not a protocol or dataset", "Did you mean 'rafdb'"],
        ),
        (["data", "describe", "--dataset", "synthfer", "--root", "/no/such/dir"], ["/no/such/dir", "does not exist"]),
        (["train", "/no/such/recipe.yaml"], ["recipe file not found"]),
        (["train", "quickstrat"], ["recipe 'quickstrat': no such file", "Did you mean 'quickstart'?"]),
        (["eval", "--dataset", "synthfer", "--root", ".", "--checkpoint", "/no/such.pt"], ["file not found"]),
    ],
)
def test_bad_inputs_exit_2_with_one_line(args, fragments):
    _one_line_error(runner.invoke(app, args), *fragments)


def test_bad_recipe_key_and_bad_checkpoint(tmp_path, tiny_synthfer):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  moment: 0.9\n")
    _one_line_error(runner.invoke(app, ["train", str(recipe)]), "optim.moment: unknown key")
    result = runner.invoke(app, ["train", str(recipe), "--set", "optim.moment"])
    _one_line_error(result, "key.path=value")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    result = runner.invoke(
        app, ["eval", "--dataset", "synthfer", "--root", str(tiny_synthfer), "--checkpoint", str(bad)]
    )
    _one_line_error(result, str(bad))


def test_corrupt_image_is_named(tmp_path, tiny_synthfer):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_synthfer, root)
    victim = sorted((root / "images" / "test").glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(root, tmp_path, **{"optim.epochs": 1})))
    # Without the prepared cache the images are decoded: evaluation on test hits the corrupt file.
    result = runner.invoke(app, ["train", str(recipe), "--set", "data.cache=off"])
    _one_line_error(result, victim.name, "cannot decode")
    # The cache renders SynthFER from its generator and never reads the PNGs, so the same run trains.
    result = runner.invoke(app, ["train", str(recipe), "--set", f"output_dir={tmp_path / 'cached'}"])
    assert result.exit_code == 0, result.output


def test_corrupt_image_stops_the_cache_build_naming_it(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf", per_code_train=3)
    victim = sorted((root / "basic" / "Image" / "aligned").glob("train_*"))[2]
    victim.write_bytes(b"\x89PNG broken")
    out = tmp_path / "cache"
    result = runner.invoke(app, ["data", "cache", "--dataset", "rafdb", "--root", str(root), "--out", str(out)])
    _one_line_error(result, victim.name, "cannot decode")
    assert not out.exists() and not list(tmp_path.glob(".cache.partial*"))  # nothing half-written is left


# ---------------------------------------------------------------------------------------------------------------------
# Dataset adapters through the CLI


@pytest.mark.parametrize("name", list_datasets())
def test_describe_json_for_every_adapter(tmp_path, name):
    root, options = formats.dataset_tree(name, tmp_path / name)
    args = ["data", "describe", "--dataset", name, "--root", str(root), "--json"]
    for key, value in options.items():
        args += ["--option", f"{key}={value}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (name, result.output)
    summary = json.loads(result.stdout)
    assert set(summary) == {"dataset", "layout", "label_space", "splits", "groups", "subsets", "dropped"}
    assert summary["dataset"] == name
    assert summary["splits"]
    for split in summary["splits"].values():
        assert split["total"] == sum(split["per_label"].values()) > 0


def test_describe_text_warns_on_counts_that_differ_from_the_card(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf")
    result = runner.invoke(app, ["data", "describe", "--dataset", "rafdb", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "train: found 14 images, expected 12,271" in result.stderr
    assert "layout: official basic" in result.stdout and "group gender:" in result.stdout
    assert "subset occlusion: 2" in result.stdout and "no Annotation/manual file" in result.stdout
    ferplus = formats.write_ferplus_csv(tmp_path / "fp")
    result = runner.invoke(app, ["data", "describe", "--dataset", "ferplus", "--root", str(ferplus)])
    assert "dropped: blank image name (excluded by FER+) 2" in result.stdout
    assert "votes from fer2013new" in result.stdout


def test_describe_bad_inputs_are_one_line(tmp_path):
    root = formats.write_affectnet_csv(tmp_path / "aff")
    csv_path = root / "Manually_Annotated_file_lists" / "training.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0], lines[1].replace(",0,0.25,", ",x,0.25,"), *lines[2:]]))
    result = runner.invoke(app, ["data", "describe", "--dataset", "affectnet", "--root", str(root)])
    _one_line_error(result, "training.csv:2:", "must be numbers")
    result = runner.invoke(app, ["data", "describe", "--dataset", "affectnet", "--root", str(root), "-o", "classes"])
    _one_line_error(result, "--option 'classes': expected key=value")
    result = runner.invoke(app, ["data", "describe", "--dataset", "rafdb", "--root", str(tmp_path)])
    _one_line_error(result, "no RAF-DB layout found", "list_patition_label.txt")


def test_verify_lists_missing_and_corrupt_images(tmp_path):
    root = formats.write_rafdb_official(tmp_path / "raf")
    result = runner.invoke(app, ["data", "verify", "--dataset", "rafdb", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "all 21 images decode" in result.output
    aligned = root / "basic" / "Image" / "aligned"
    (aligned / "train_00001_aligned.jpg").unlink()
    (aligned / "test_0002_aligned.jpg").write_bytes(b"\xff\xd8 truncated")
    result = runner.invoke(app, ["data", "verify", "--dataset", "rafdb", "--root", str(root)])
    _one_line_error(result, "2 of 21 images missing or corrupt")
    assert "train_00001_aligned.jpg: image file is missing" in result.output
    assert "test_0002_aligned.jpg: cannot decode" in result.output


def test_cross_dataset_eval_masks_contempt(tiny_synthfer, tmp_path):
    """An all8 SynthFER model scored on a 7-class dataset: the contempt logit is masked, the report says so."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    root = formats.write_class_folders(tmp_path / "fer", per_class=3)
    args = ["eval", "--dataset", "fer2013", "--root", str(root), "--checkpoint", str(tmp_path / "run" / "best.pt")]
    result = runner.invoke(app, [*args, "--json", "--no-tracking", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert results["cross_dataset"]["masked_logits"] == ["contempt"]
    assert results["label_space"]["name"] == "basic7" and results["n"] == 21
    assert len(results["confusion_matrix"]) == 7
    assert "masked model logits (not in the dataset): contempt" in (tmp_path / "ev" / "report.md").read_text()


def test_recipes_lists_the_shipped_recipes_with_what_they_need():
    result = runner.invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "quickstart" in line)
    assert "Quickstart: a small ViT" in line and "no dataset (SynthFER), CPU ok" in line
    assert "rafdb data, GPU, pretrained weights" in result.stdout
