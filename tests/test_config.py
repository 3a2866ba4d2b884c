"""training/config.py: defaults, YAML precedence and errors, every validation rule, the saved-config round trip.

Fast and model-free: `--pretrained_model tiny` is only named, never built or loaded.
"""

import argparse
import importlib.util
import re

import pytest
import yaml

from training.config import (
    ConfigError,
    build_parser,
    parse_config,
    parse_or_exit,
    save_resolved_config,
    validate,
)

GROUPS = ["data", "model", "LoRA", "optimization", "timesteps, noise & loss weighting",
          "runtime: seed, precision, memory & caches", "output & checkpoints", "validation, evaluation & logging"]


@pytest.fixture
def tmp(tmp_path):
    """A data folder plus a few files the path rules need; returns tmp_path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "sdxl" / "unet").mkdir(parents=True)
    (tmp_path / "sdxl" / "unet" / "config.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("a photo of a dog\n\n  a red cube  \n")
    (tmp_path / "empty_prompts.txt").write_text("\n \n")
    return tmp_path


@pytest.fixture
def base(tmp):
    """The three required flags, valid."""
    return ["--data_dir", str(tmp / "data"), "--pretrained_model", "tiny", "--output_dir", str(tmp / "out")]


@pytest.fixture
def no_optional_packages(monkeypatch):
    """Make bitsandbytes, prodigyopt, schedulefree and wandb look uninstalled, whatever this machine has."""
    real, missing = importlib.util.find_spec, ("bitsandbytes", "prodigyopt", "schedulefree", "wandb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))


def write_yaml(path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def check(argv):
    args = parse_config(argv)
    validate(args)
    return args


def test_defaults(tmp, base):
    args = check(base)
    expected = dict(
        image_size=1024, bucketing=True, center_crop=False, random_flip=False, caption_dropout=0.0,
        shuffle_tags=False, keep_tokens=0, max_bad_fraction=0.05, num_workers=2, val_data_dir=None,
        pretrained_model="tiny", vae_model=None, lora_rank=16, lora_alpha=16.0, lora_dropout=0.0,
        lora_target_mode="attention_out", batch_size=1, gradient_accumulation_steps=1, num_epochs=1,
        max_train_steps=None, learning_rate=1e-4, optimizer="adamw", weight_decay=1e-2, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, lr_scheduler="constant", warmup_steps=0, max_grad_norm=1.0,
        min_timestep=0, max_timestep=999, prediction_type="epsilon", min_snr_gamma=0.0, noise_offset=0.0,
        max_nonfinite_steps=5, seed=0, use_ema=False, ema_decay=0.999, compile=False,
        gradient_checkpointing=False, cache_latents="none", cache_text_embeddings=False, save_interval=500,
        save_format="kohya", save_every_n_epochs=0, keep_last=0, resume_from=None, overwrite_output_dir=False,
        config=None, validation_prompts=[], validation_interval=100, num_validation_images=4,
        wandb_project=None, wandb_run_name=None, log_interval=1, eval_interval=0, eval_num_images=32,
        eval_real_dir=None, inception_weights=None, clip_model=None, keep_best="none", lr_schedule_total=None,
        timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, loss_weighting="none",
        multires_noise_iterations=0, multires_noise_discount=0.3, input_perturbation=0.0, prodigy_d_coef=1.0,
        prodigy_use_bias_correction=False, prodigy_safeguard_warmup=False,
        masked_loss=False, mask_dir=None, alpha_mask=False, dataset_config=None, caption_extension=".txt",
        caption_prefix="", caption_suffix="", keep_tokens_separator="", conv_rank=0, conv_alpha=0.0,
        use_dora=False, train_text_encoder=False, text_encoder_lr=None, text_encoder_target_mode="attention",
        t5=True, max_sequence_length=None, sigmoid_scale=1.0, flow_shift=None, precondition_outputs=False,
        guidance_scale=1.0, verbose=False, shard_base=False,
        data_dir=str(tmp / "data"), output_dir=str(tmp / "out"), cache_dir=str(tmp / "out" / "cache"),
    )
    got = vars(args)
    assert {k: got[k] for k in expected} == expected
    assert args.device in ("cpu", "cuda")  # auto resolved
    assert args.precision == ("fp32" if args.device == "cpu" else "bf16")  # auto: emulated bf16 is slow on a CPU
    assert args.base_dtype == args.precision  # auto: stored as computed
    assert set(got) == set(expected) | {"device", "precision", "base_dtype"}


def test_relative_paths_become_absolute(tmp, base, monkeypatch):
    monkeypatch.chdir(tmp)
    args = check(["--data_dir", "data", "--pretrained_model", "sdxl", "--output_dir", "out"])
    assert (args.data_dir, args.pretrained_model) == (str(tmp / "data"), str(tmp / "sdxl"))
    assert args.cache_dir == str(tmp / "out" / "cache")


def test_yaml_sets_values_and_cli_overrides(tmp):
    cfg = write_yaml(tmp / "c.yaml", (
        f"data_dir: {tmp / 'data'}\npretrained_model: tiny\noutput_dir: {tmp / 'out'}\n"
        "learning_rate: 3e-4\n"  # a string to YAML 1.1: goes through float() like a flag
        "lora_rank: 8\nuse_ema: true\nbucketing: false\noptimizer: adamw\nvalidation_prompts: [a dog, a cat]\n"
        "max_train_steps: null\n"
    ))
    args = check(["--config", cfg])
    assert (args.learning_rate, args.lora_rank, args.lora_alpha, args.use_ema, args.bucketing) == (3e-4, 8, 8.0,
                                                                                                   True, False)
    assert args.validation_prompts == ["a dog", "a cat"] and args.max_train_steps is None
    assert args.config == cfg
    args = check(["--config", cfg, "--lora_rank", "4", "--no-use_ema", "--bucketing", "--validation_prompts", "x",
                  "--output_dir", str(tmp / "other")])
    assert (args.lora_rank, args.lora_alpha, args.use_ema, args.bucketing) == (4, 4.0, False, True)
    assert args.validation_prompts == ["x"] and args.output_dir == str(tmp / "other")
    assert args.learning_rate == 3e-4  # untouched YAML value survives


def test_missing_required_flag_is_an_argparse_error(tmp, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--data_dir", str(tmp / "data"), "--pretrained_model", "tiny"])
    assert e.value.code == 2 and "--output_dir" in capsys.readouterr().err


def test_unknown_yaml_key_names_key_file_and_suggestion(tmp, base):
    cfg = write_yaml(tmp / "c.yaml", {"learning_rat": 1e-4})
    with pytest.raises(ConfigError) as e:
        parse_config([*base, "--config", cfg])
    msg = str(e.value)
    assert "'learning_rat'" in msg and cfg in msg and "did you mean 'learning_rate'" in msg
    cfg = write_yaml(tmp / "c.yaml", {"zzzzzz": 1})
    with pytest.raises(ConfigError, match="unknown key 'zzzzzz'; see train_sdxl.py --help"):
        parse_config([*base, "--config", cfg])


@pytest.mark.parametrize("key, value", [
    ("learning_rate", "abc"), ("batch_size", 2.5), ("batch_size", True), ("lora_rank", [1, 2]),
    ("use_ema", "yes"), ("optimizer", "sgd"), ("precision", "fp8"), ("validation_prompts", {"a": 1}),
    ("seed", "1e3"), ("pretrained_model", None), ("image_size", None), ("config", "other.yaml"),
])
def test_bad_yaml_value_names_the_key(tmp, base, key, value):
    cfg = write_yaml(tmp / "c.yaml", {key: value})
    with pytest.raises(ConfigError) as e:
        parse_config([*base, "--config", cfg])
    assert f"{key}" in str(e.value) and cfg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, fragment", [
    ("- a\n- b\n", "must be a mapping"), ("just a string\n", "must be a mapping"),
    ("a: [1, 2\n", "not valid YAML"), ("a: b: c\n", "not valid YAML"),
])
def test_bad_yaml_file_is_one_line(tmp, base, text, fragment):
    cfg = write_yaml(tmp / "c.yaml", text)
    with pytest.raises(ConfigError, match=fragment) as e:
        parse_config([*base, "--config", cfg])
    assert "\n" not in str(e.value)


def test_missing_or_unreadable_config_file(tmp, base):
    for path in (tmp / "nope.yaml", tmp / "empty_dir"):
        with pytest.raises(ConfigError, match="cannot read it") as e:
            parse_config([*base, "--config", str(path)])
        assert "\n" not in str(e.value)


def test_empty_yaml_file_is_no_settings(tmp, base):
    assert check([*base, "--config", write_yaml(tmp / "c.yaml", "")]).lora_rank == 16


BAD = [  # (extra flags; "{tmp}" is the fixture folder), flag the message must name
    (["--image_size", "1000"], "image_size"), (["--image_size", "0"], "image_size"),
    (["--caption_dropout", "1.0"], "caption_dropout"), (["--caption_dropout", "-0.1"], "caption_dropout"),
    (["--keep_tokens", "-1"], "keep_tokens"), (["--max_bad_fraction", "1.5"], "max_bad_fraction"),
    (["--num_workers", "-1"], "num_workers"), (["--lora_rank", "0"], "lora_rank"),
    (["--lora_alpha", "0"], "lora_alpha"),
    (["--lora_dropout", "1"], "lora_dropout"), (["--batch_size", "0"], "batch_size"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"), (["--num_epochs", "0"], "num_epochs"),
    (["--max_train_steps", "0"], "max_train_steps"), (["--learning_rate", "0"], "learning_rate"),
    (["--learning_rate", "nan"], "learning_rate"), (["--learning_rate", "inf"], "learning_rate"),
    (["--weight_decay", "-1"], "weight_decay"), (["--adam_beta1", "1.0"], "adam_beta1"),
    (["--adam_beta2", "-0.1"], "adam_beta2"), (["--adam_epsilon", "0"], "adam_epsilon"),
    (["--warmup_steps", "-1"], "warmup_steps"), (["--max_grad_norm", "-1"], "max_grad_norm"),
    (["--min_timestep", "-1"], "min_timestep"), (["--max_timestep", "1000"], "max_timestep"),
    (["--min_timestep", "500", "--max_timestep", "400"], "min_timestep"),
    (["--min_snr_gamma", "-1"], "min_snr_gamma"), (["--noise_offset", "-0.1"], "noise_offset"),
    (["--max_nonfinite_steps", "-1"], "max_nonfinite_steps"), (["--seed", "-1"], "seed"),
    (["--seed", str(2**32)], "seed"), (["--ema_decay", "1.0"], "ema_decay"), (["--ema_decay", "0"], "ema_decay"),
    (["--save_interval", "-1"], "save_interval"), (["--validation_interval", "-1"], "validation_interval"),
    (["--num_validation_images", "0"], "num_validation_images"), (["--log_interval", "0"], "log_interval"),
    (["--resume_from", "{tmp}/nope"], "resume_from"), (["--keep_last", "-1"], "keep_last"),
    (["--save_every_n_epochs", "-1"], "save_every_n_epochs"),
    (["--resume_from", "latest", "--overwrite_output_dir"], "overwrite_output_dir"),
    (["--shuffle_tags", "--cache_text_embeddings"], "shuffle_tags"),
    (["--precision", "fp16", "--device", "cpu"], "precision"), (["--device", "tpu"], "device"),
    (["--device", "cuda:99"], "device"), (["--optimizer", "adamw8bit"], "optimizer"),
    (["--wandb_project", "p"], "wandb_project"), (["--wandb_run_name", "r"], "wandb_run_name"),
    (["--data_dir", "{tmp}/nope"], "data_dir"), (["--data_dir", "{tmp}/file.txt"], "data_dir"),
    (["--data_dir", "{tmp}/nope/train-{{000000..000009}}.tar"], "data_dir"),
    (["--data_dir", "{tmp}/shards/missing.tar"], "data_dir"), (["--val_data_dir", "{tmp}/nope"], "val_data_dir"),
    (["--output_dir", "{tmp}/file.txt"], "output_dir"), (["--cache_dir", "{tmp}/file.txt"], "cache_dir"),
    (["--pretrained_model", "{tmp}/nope"], "pretrained_model"),
    (["--pretrained_model", "{tmp}/model.ckpt"], "pretrained_model"),
    (["--pretrained_model", "{tmp}/empty_dir"], "pretrained_model"),
    (["--vae_model", "{tmp}/nope"], "vae_model"), (["--vae_model", "{tmp}/empty_dir"], "vae_model"),
    (["--validation_prompts", "{tmp}/missing.txt"], "validation_prompts"),
    (["--validation_prompts", "{tmp}/empty_prompts.txt"], "validation_prompts"),
    (["--keep_best", "kid"], "keep_best"), (["--keep_best", "val_loss"], "keep_best"),
    (["--eval_interval", "5", "--inception_weights", "{tmp}/file.txt"], "eval_interval"),  # no validation prompts
    (["--eval_interval", "5", "--validation_prompts", "a dog", "--inception_weights", "{tmp}/nope.pt"],
     "inception_weights"),
    (["--eval_interval", "5", "--validation_prompts", "a dog", "--inception_weights", "{tmp}/file.txt",
      "--clip_model", "{tmp}/empty_dir"], "clip_model"),
    (["--eval_interval", "5", "--validation_prompts", "a dog", "--inception_weights", "{tmp}/file.txt",
      "--eval_real_dir", "{tmp}/nope"], "eval_real_dir"),
    (["--eval_num_images", "0"], "eval_num_images"), (["--eval_interval", "-1"], "eval_interval"),
    (["--optimizer", "prodigy"], "optimizer"), (["--optimizer", "adamw_schedulefree"], "optimizer"),
    (["--logit_std", "0"], "logit_std"), (["--multires_noise_iterations", "-1"], "multires_noise_iterations"),
    (["--multires_noise_discount", "0"], "multires_noise_discount"),
    (["--input_perturbation", "-0.1"], "input_perturbation"), (["--prodigy_d_coef", "0"], "prodigy_d_coef"),
    (["--data_dir", "{tmp}/shards"], "data_dir"), (["--data_dir", "{tmp}/shards/train-000000.tar"], "data_dir"),
    (["--data_dir", "https://example.com/train-{{000..009}}.tar"], "data_dir"),  # streamed: no --max_train_steps
]


@pytest.mark.parametrize("extra, flag", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_each_rule_rejects_a_bad_value(tmp, base, no_optional_packages, extra, flag):
    extra = [a.format(tmp=tmp) for a in extra]
    with pytest.raises(ConfigError) as e:
        check(base + extra)
    msg = str(e.value)
    assert msg.startswith(f"--{flag}") and "\n" not in msg, msg
    if flag in ("optimizer", "wandb_project"):
        assert "pip install" in msg


@pytest.mark.parametrize("extra", [
    ["--data_dir", "{tmp}/shards/train-000000.tar", "--max_train_steps", "9"], ["--data_dir", "{tmp}/shards",
    "--max_train_steps", "9"], ["--data_dir", "{tmp}/shards/train-{{000000..000009}}.tar", "--max_train_steps", "9"],
    ["--data_dir", "https://example.com/train-{{000..009}}.tar", "--max_train_steps", "9"],
    ["--val_data_dir", "{tmp}/data"],
    ["--pretrained_model", "{tmp}/sdxl"], ["--pretrained_model", "{tmp}/model.safetensors"],
    ["--vae_model", "{tmp}/vae"], ["--output_dir", "{tmp}/data"], ["--image_size", "128", "--no-bucketing"],
    ["--precision", "bf16", "--device", "cpu"], ["--precision", "fp32", "--device", "cpu"],
    ["--caption_dropout", "0.1", "--cache_text_embeddings", "--cache_latents", "memory"],
    ["--min_timestep", "500", "--max_timestep", "500"], ["--max_grad_norm", "0", "--min_snr_gamma", "5"],
    ["--eval_interval", "5", "--validation_prompts", "a dog", "--inception_weights", "{tmp}/file.txt",
     "--keep_best", "kid"], ["--val_data_dir", "{tmp}/data", "--keep_best", "val_loss"],
])
def test_good_values_pass(tmp, base, extra):
    check(base + [a.format(tmp=tmp) for a in extra])


def test_cached_latents_cache_both_flips_and_crop_the_center(tmp, base):
    args = check([*base, "--random_flip", "--cache_latents", "disk"])
    assert args.random_flip and args.center_crop  # the cache is keyed by the pixels: two entries per image


def test_resume_from_resolves_and_is_not_saved(tmp, base):
    (tmp / "ck").mkdir()
    assert check([*base, "--resume_from", "latest"]).resume_from == "latest"
    args = check([*base, "--resume_from", str(tmp / "ck")])
    assert args.resume_from == str(tmp / "ck")
    saved = yaml.safe_load(save_resolved_config(args, tmp / "out").read_text())
    assert "resume_from" not in saved and "overwrite_output_dir" not in saved


def test_prompts_file_is_read(tmp, base):
    args = check([*base, "--validation_prompts", str(tmp / "prompts.txt")])
    assert args.validation_prompts == ["a photo of a dog", "a red cube"]


def test_parse_or_exit_prints_one_line_and_exits_2(tmp, base, capsys):
    with pytest.raises(SystemExit) as e:
        parse_or_exit([*base, "--lora_rank", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --lora_rank 0: must be >= 1") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        parse_or_exit([*base, "--config", write_yaml(tmp / "c.yaml", {"lora_rnk": 4})])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --config") and "lora_rank" in err and err.count("\n") == 1
    assert parse_or_exit(base).lora_rank == 16


def test_dash_aliases(tmp):
    args = check(["--data-dir", str(tmp / "data"), "--pretrained-model", "tiny", "--output-dir", str(tmp / "out"),
                  "--lora-rank", "4", "--random-flip", "--no-bucketing", "--gradient-checkpointing",
                  "--learning-rate", "2e-4", "--cache-latents", "memory", "--no-random-flip"])
    assert (args.lora_rank, args.random_flip, args.bucketing, args.gradient_checkpointing) == (4, False, False, True)
    assert (args.learning_rate, args.cache_latents) == (2e-4, "memory")


def test_abbreviations_are_refused(base):
    with pytest.raises(SystemExit):
        parse_config([*base, "--lora_r", "4"])


def test_help_lists_every_group_and_every_flag_is_documented(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"\n{group}:\n" in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), action.dest
        assert "(default:" in action.help or "(required" in action.help, action.dest
        assert f"--{action.dest}" in action.option_strings
        if "_" in action.dest:
            assert f"--{action.dest.replace('_', '-')}" in action.option_strings
        assert f"--{action.dest}" in text


def test_saved_config_round_trips(tmp, base):
    args = check([*base, "--lora_rank", "8", "--lora_alpha", "4.5", "--learning_rate", "3.3e-5", "--use_ema",
                  "--adam_epsilon", "1e-10", "--validation_prompts", str(tmp / "prompts.txt"), "--max_train_steps",
                  "77", "--no-bucketing", "--image_size", "128", "--vae_model", str(tmp / "vae"),
                  "--lora_target_mode", "all", "--precision", "fp32", "--device", "cpu"])
    path = save_resolved_config(args, tmp / "out")
    assert path == tmp / "out" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert "config" not in saved and list(saved) == sorted(saved)
    again = check(["--config", str(path)])
    assert again.config == str(path)
    assert {**vars(again), "config": None} == {**vars(args), "config": None}
    assert save_resolved_config(again, tmp / "out2").read_text() == path.read_text()


def test_saved_config_round_trips_defaults(tmp, base):
    args = check(base)
    again = check(["--config", str(save_resolved_config(args, tmp / "out"))])
    assert {**vars(again), "config": None} == {**vars(args), "config": None}
    assert not re.search(r"\.tmp$", " ".join(p.name for p in (tmp / "out").iterdir()))


def test_recipe_defaults_resolve(tmp, base):
    """Prodigy's learning rate defaults to 1.0; --min_snr_gamma alone means min_snr; min_snr alone means gamma 5."""
    assert check([*base, "--optimizer", "prodigy"]).learning_rate == 1.0
    assert check([*base, "--optimizer", "prodigy", "--learning_rate", "0.5"]).learning_rate == 0.5
    args = check([*base, "--min_snr_gamma", "3"])
    assert (args.loss_weighting, args.min_snr_gamma) == ("min_snr", 3.0)
    args = check([*base, "--loss_weighting", "min_snr"])
    assert (args.loss_weighting, args.min_snr_gamma) == ("min_snr", 5.0)


def test_optimizer_that_cannot_run_here_is_one_line(tmp, base, monkeypatch):
    """adamw8bit on a CPU (bitsandbytes installed or not), schedule-free with an LR schedule."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes"
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"^--optimizer adamw8bit: needs a CUDA GPU \(bitsandbytes\), not cpu"):
        check([*base, "--optimizer", "adamw8bit", "--device", "cpu"])
    with pytest.raises(ConfigError, match=r"^--lr_scheduler cosine: schedule-free AdamW needs no learning-rate"):
        check([*base, "--optimizer", "adamw_schedulefree", "--lr_scheduler", "cosine"])


def test_missing_recipe_package_names_the_extra(tmp, base, no_optional_packages):
    with pytest.raises(ConfigError) as e:
        check([*base, "--optimizer", "prodigy"])
    assert str(e.value) == ("--optimizer prodigy: needs prodigyopt, which is not installed; run `pip install -e "
                            ".[recipes]` or use --optimizer adamw")


def test_checkpoint_from_before_the_recipe_flags_resumes_with_their_defaults(tmp, base):
    """An older config.yaml lacks the newer keys: its run used their defaults (Min-SNR when min_snr_gamma > 0)."""
    from training.run.checkpoints import MUST_MATCH, settings_differences, with_later_settings

    for old_extra in ([], ["--min_snr_gamma", "5"]):
        current = vars(check(base + old_extra))
        old = {k: v for k, v in current.items() if k in MUST_MATCH and k not in with_later_settings({})}
        assert settings_differences(with_later_settings(old), current) == []
    current = vars(check(base + ["--loss_weighting", "debiased"]))
    old = {k: v for k, v in current.items() if k in MUST_MATCH and k not in with_later_settings({})}
    assert settings_differences(with_later_settings(old), current) == ["loss_weighting: checkpoint 'none', now "
                                                                        "'debiased'"]
