"""CoCoMix training at every parallel layout against one process; precomputed vs online labels; baselines.

The student is tests/helpers/launch.py's TINY_GPT (4 layers) with the concept layer at block 2, online labels from a tiny
random GPT-2 teacher + random TopK SAE (tests/helpers/cocomix_assets.py), dropout off. Every layout trains from the same
seed (initialisation is layout-independent) on the same mock data, and must reproduce the single-process run's
lm loss AND concept loss at each of the 4 iterations (and the validation losses, after the 4th update) to 1e-5
relative. All 4 optimizer steps have a non-zero learning rate.

Launches are few (tests/helpers/multi_run_worker.py runs several trainings in one launch):
- 1 process: online CoCoMix (concept layer 2; layer 1; layer 1 with rotary positions), label extraction with
  tools/extract_concepts.py (keeping the teacher's final states too), training on those precomputed labels, NTP,
  and the ablations / baselines (--concept-mixing none --no-concept-loss, add, --pause-tokens, --kd, and --kd
  from the precomputed teacher states);
- 2 processes: TP2, PP2 (concept layer on the second stage), TP2+SP, PP2 x VPP2 (concept layer on a middle
  virtual stage; the 2s-long stream crosses a stage boundary), PP2 with the concept layer on the first stage
  (2s positions sent between stages) with learned and with rotary positions, TP2+SP with rotary positions,
  KD at TP2 (teacher distribution sliced over the vocabulary shards; online and from precomputed states), pause tokens at PP2 x VPP2 and at TP2+SP,
  additive mixing at TP2+SP, and DP2 with DeepSpeed ZeRO-1;
- 4 processes: TP2 x PP2 with online and with precomputed labels.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cocomix_assets import TEACHER_LAYER, cocomix_flags, tiny_teacher
from tests.helpers.launch import (
    MULTI_RUN_WORKER,
    TINY_GPT,
    assert_close,
    assert_real_updates,
    losses,
    run_script,
    update_learning_rates,
)

RTOL = 1e-5


def cocomix(concept_layer: int = 2):
    return TINY_GPT + cocomix_flags(concept_layer=concept_layer, topk=4)


def run_many(tmp_path, runs, nproc: int, timeout: int = 600) -> dict:
    spec, out = tmp_path / "runs.json", tmp_path / "summaries.json"
    spec.write_text(json.dumps(runs))
    proc = run_script(MULTI_RUN_WORKER, [str(spec), str(out)], nproc=nproc, timeout=timeout)
    summaries = json.loads(out.read_text())
    summaries["stdout"] = proc.stdout
    return summaries


def assert_same_training(result, reference, what, keys=("lm loss", "concept loss")):
    assert result["iteration"] == 4, what
    # Every run here has TINY_GPT's schedule.
    assert_real_updates(update_learning_rates(result, TINY_GPT), what=what)
    assert_close(losses(result, "lr"), losses(reference, "lr"), rtol=1e-12, what=f"{what} learning rate")
    for key in keys:
        assert_close(losses(result, key), losses(reference, key), rtol=RTOL, what=f"{what} train {key}")
        if key in reference.get("valid", {}):
            assert_close([result["valid"][key]], [reference["valid"][key]], rtol=RTOL, what=f"{what} valid {key}")


@pytest.fixture(scope="module")
def labels_prefix(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cocomix_labels") / "labels")


def precomputed(flags, prefix):
    return flags + ["--concept-labels", prefix]


ROPE = ["--position-embedding-type", "rope"]
REFERENCE_MASKING = ["--concept-label-masking", "reference"]


def reference_argv(name, labels_prefix):
    """The single-process runs the layouts are compared with, by name."""
    teacher = ["--teacher-model", tiny_teacher(), "--teacher-layer", str(TEACHER_LAYER)]
    return {
        "online": cocomix(),
        "precomputed": precomputed(cocomix(), labels_prefix),
        "online_reference": cocomix() + REFERENCE_MASKING,
        # The teacher and SAE flags are given (cocomix()), so the file's fingerprint is checked against them.
        "precomputed_reference": precomputed(cocomix() + REFERENCE_MASKING, labels_prefix + "_reference"),
        "online_layer1": cocomix(concept_layer=1),
        "online_rope_layer1": cocomix(concept_layer=1) + ROPE,
        "ntp": TINY_GPT,
        "mixing_none_no_loss": cocomix() + ["--concept-mixing", "none", "--no-concept-loss"],
        "mixing_add": cocomix() + ["--concept-mixing", "add"],
        "pause": TINY_GPT + ["--pause-tokens", "--concept-layer", "2"],
        "kd": TINY_GPT + ["--kd"] + teacher,
        # The teacher's final states of the training samples, kept by the "extract" run (--teacher-states-prefix).
        "kd_states": TINY_GPT + ["--kd"] + teacher + ["--kd-teacher-states", labels_prefix + "_states"],
    }[name]


SINGLE = ["online", "extract", "precomputed", "online_reference", "extract_reference", "precomputed_reference",
          "online_layer1", "online_rope_layer1", "ntp", "mixing_none_no_loss", "mixing_add", "pause", "kd",
          "kd_states"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, labels_prefix):
    runs = []
    for name in SINGLE:
        if name == "extract":
            runs.append([name, "extract", cocomix() + ["--output-prefix", labels_prefix, "--no-tokenizer-check",
                                                         "--no-progress", "--teacher-states-prefix",
                                                         labels_prefix + "_states"]])
        elif name == "extract_reference":
            runs.append([name, "extract", cocomix() + REFERENCE_MASKING + [
                "--output-prefix", labels_prefix + "_reference", "--no-tokenizer-check", "--no-progress"]])
        else:
            runs.append([name, "pretrain", reference_argv(name, labels_prefix)])
    return run_many(tmp_path_factory.mktemp("cocomix_single"), runs, nproc=1)


TP2, PP2 = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]
VPP2 = PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"]
# layout: (single-process reference, layout flags). With the concept layer at 1 the stream crossing the PP2
# stage boundary is 2s long; under PP2 x VPP2 the layer at 2 is on a middle virtual stage, the same holds.
TWO_PROCESS = {
    "tp2": ("online", TP2),
    "pp2": ("online", PP2),
    "tp2_sp": ("online", TP2 + ["--sequence-parallel"]),
    "pp2_vpp2": ("online", VPP2),
    "pp2_concept_layer_on_first_stage": ("online_layer1", PP2),
    "pp2_rope_concept_layer_on_first_stage": ("online_rope_layer1", PP2),
    "tp2_sp_rope": ("online_rope_layer1", TP2 + ["--sequence-parallel"]),
    "kd_tp2": ("kd", TP2),
    "kd_states_tp2": ("kd_states", TP2),
    "pause_pp2_vpp2": ("pause", VPP2),
    # The ablations where sequence parallelism matters: the compression reduce-scattered along the sequence and
    # added to each shard; the pause vector's gradient summed over the TP ranks' shards.
    "mixing_add_tp2_sp": ("mixing_add", TP2 + ["--sequence-parallel"]),
    "pause_tp2_sp": ("pause", TP2 + ["--sequence-parallel"]),
    # DeepSpeed last: it is the one run that brings its own communication layer.
    "dp2_zero1": ("online", ["--deepspeed", "--deepspeed_config", None]),
}
FOUR_PROCESS = {
    "tp2_pp2": ("online", TP2 + PP2),
    "tp2_pp2_precomputed": ("precomputed", TP2 + PP2),
}


def _layout_argv(case, labels_prefix, ds_config):
    reference, flags = case
    return reference_argv(reference, labels_prefix) + [ds_config if f is None else f for f in flags]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory, single, labels_prefix):
    tmp = tmp_path_factory.mktemp("cocomix_two")
    ds_config = tmp / "ds_zero1.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    runs = [[name, "pretrain", _layout_argv(case, labels_prefix, str(ds_config))]
            for name, case in TWO_PROCESS.items()]
    return run_many(tmp, runs, nproc=2)


@pytest.fixture(scope="module")
def four_process(tmp_path_factory, single, labels_prefix):
    runs = [[name, "pretrain", _layout_argv(case, labels_prefix, None)] for name, case in FOUR_PROCESS.items()]
    return run_many(tmp_path_factory.mktemp("cocomix_four"), runs, nproc=4)


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", list(TWO_PROCESS))
def test_two_process_layout_matches_single_process(layout, two_process, single):
    reference = TWO_PROCESS[layout][0]
    keys = {"kd": ("lm loss", "kd loss"), "kd_states": ("lm loss", "kd loss"),
            "pause": ("lm loss",)}.get(reference, ("lm loss", "concept loss"))
    assert_same_training(two_process[layout], single[reference], layout, keys=keys)


@pytest.mark.parametrize("layout", list(FOUR_PROCESS))
def test_four_process_layout_matches_single_process(layout, four_process, single):
    reference = FOUR_PROCESS[layout][0]
    assert_same_training(four_process[layout], single[reference], layout)


# ----------------------------------------------------------------------------------------------- labels
def test_precomputed_labels_give_the_online_losses(single, labels_prefix):
    assert single["extract"]["exit_code"] == 0
    meta = json.loads(open(labels_prefix + ".json").read())
    assert int(meta["num_samples"]) == 32 and int(meta["num_latents"]) == 64
    assert_same_training(single["precomputed"], single["online"], "precomputed labels", keys=("lm loss",))
    assert_close(losses(single["precomputed"], "concept loss"), losses(single["online"], "concept loss"), rtol=RTOL,
                 what="precomputed labels concept loss")
    # Validation samples have no precomputed labels: the concept layer still mixes (same lm loss as online),
    # without a concept loss.
    assert "concept loss" not in single["precomputed"]["valid"]
    for key in ("concept top1 acc", "concept topk acc"):
        assert_close(losses(single["precomputed"], key), losses(single["online"], key), rtol=RTOL, what=key)


def test_kd_from_precomputed_teacher_states_gives_the_online_losses(single, labels_prefix):
    """--kd-teacher-states: the KD student trained on the teacher's final states kept by the label extraction
    (the teacher's head applied to them, no teacher forward) has the online KD student's losses."""
    meta = json.loads(open(labels_prefix + "_states.json").read())
    assert meta["num_samples"] == 32 and meta["d_model"] == 32 and meta["format"] == "teacher_final_states"
    assert_same_training(single["kd_states"], single["kd"], "KD from precomputed states", keys=("lm loss", "kd loss"))


def test_reference_label_masking_online_equals_precomputed(single):
    """--concept-label-masking reference (the official labels: no -1) is one flag for online labels, label
    extraction and the fingerprint: the precomputed file trains with the teacher and SAE flags given."""
    assert single["extract_reference"]["exit_code"] == 0
    for key in ("lm loss", "concept loss"):
        assert_close(losses(single["precomputed_reference"], key), losses(single["online_reference"], key),
                     rtol=RTOL, what=f"reference-masked precomputed {key}")
    # The labels differ from the masked ones (every position, the last included, carries 4 labels).
    assert losses(single["online_reference"], "concept loss") != losses(single["online"], "concept loss")


def test_cocomix_trains_and_logs_concept_metrics(single):
    online = single["online"]
    # The first run's Megatron log line carries the concept metrics beside the lm loss.
    line = next(text for text in single["stdout"].splitlines() if "iteration        4/       4" in text)
    for field in ("| lm loss: ", "| concept loss: ", "| concept top1 acc: ", "| concept topk acc: ",
                  "| concept dead columns: "):
        assert field in line, (field, line)
    logged = float(line.split("| concept loss: ")[1].split(" |")[0])
    assert logged == pytest.approx(losses(online, "concept loss")[-1], rel=1e-6)
    for entry in online["train_history"]:
        for key in ("concept top1 acc", "concept topk acc", "concept dead columns"):
            assert 0 <= entry[key] <= 1, (key, entry[key])
    # C = 64 concepts: a fresh predictor is near-uniform, so the concept loss starts near log 64.
    first = losses(online, "concept loss")[0]
    assert abs(first - 4.1589) < 0.3, first
    assert losses(online, "concept loss")[-1] < first


# ----------------------------------------------------------------------------------------------- ablations
def test_no_mixing_no_concept_loss_equals_ntp(single):
    """--concept-mixing none --no-concept-loss: the concept head runs (its loss is still logged) but touches
    neither the stream nor the gradient, so training is exactly NTP's."""
    ablation, ntp = single["mixing_none_no_loss"], single["ntp"]
    assert_close(losses(ablation), losses(ntp), rtol=RTOL, what="lm loss")
    assert_close([ablation["valid"]["lm loss"]], [ntp["valid"]["lm loss"]], rtol=RTOL, what="valid lm loss")
    assert "concept loss" in ablation["train_history"][0]


def test_ablations_and_baselines_behave_as_defined(single):
    ntp, online = single["ntp"], single["online"]
    first = {name: losses(single[name])[0] for name in ("ntp", "online", "mixing_add", "pause", "kd")}
    # Layers below L are the same network in every run: the concept head sees the same input at step 1.
    for name in ("mixing_add", "mixing_none_no_loss", "precomputed"):
        assert_close(losses(single[name], "concept loss")[:1], losses(online, "concept loss")[:1], rtol=RTOL,
                     what=f"{name} step-1 concept loss")
    # KD: same student and step-1 forward as NTP (the KL term only changes the gradient), kd loss logged > 0.
    assert_close([first["kd"]], [first["ntp"]], rtol=RTOL, what="kd step-1 lm loss")
    kd = losses(single["kd"], "kd loss")
    assert all(v > 0 for v in kd), kd
    assert abs(losses(single["kd"])[-1] - losses(ntp)[-1]) > 1e-6, "the KD term did not change training"
    # Interleaving concepts, adding them, or interleaving pause vectors each change the forward from step 1.
    for name in ("online", "mixing_add", "pause"):
        assert abs(first[name] - first["ntp"]) > 1e-6 * first["ntp"], f"{name} step-1 lm loss equals NTP's"
    assert abs(first["online"] - first["mixing_add"]) > 1e-4 and abs(first["online"] - first["pause"]) > 1e-4
    assert "concept loss" not in single["pause"]["train_history"][0]
    assert "concept loss" not in ntp["train_history"][0]
