"""MolmoEBackend on the fixture's tiny checkpoint: every knob acts, counted by hooks."""
import pytest
import torch

from envs.backends import make_backend
from envs.backends.molmoe import MolmoEBackend
from envs.backends.vlm import elastic
from envs.data.sample import VQASample
from molmoe_fixture import FIXTURE, cases, image, requires_fixture, write_results

pytestmark = requires_fixture
FIXTURE_TIERS = {"low": 1, "medium": 4, "high": 12}  # the fixture's max_crops values


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    # importance: block 3 > block 1 > blocks 0, 2, so N=3 at p=1 keeps [0, 1, 3] and skips block 2
    return write_results(tmp_path_factory.mktemp("molmoe_results"))


@pytest.fixture(scope="module")
def backend(results_dir):
    # The fixture's prompts go in as they are, so prefill lengths are the reference's.
    return MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, tier_max_crops=FIXTURE_TIERS,
                         prompt_templates={"synthvqa": "{question}"}, max_new_tokens=3)


def sample_of(case):
    return VQASample(question=case["prompt"], answers=["red"] * 10, question_id=case["id"], dataset="synthvqa",
                     image_loader=lambda: image(case), family="coarse")


def case(name):
    return next(c for c in cases() if c["id"] == name)


def budget(seed=0):
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


class BlockLog:
    """(block, sequence length, top-k, cached length) of every block call, and the expert rows."""

    def __init__(self, backend, monkeypatch):
        self.calls, self.expert_rows, self._current = [], [], None
        self.handles = [b.register_forward_pre_hook(self._pre) for b in backend.model.blocks]
        real = elastic.run_experts

        def counting(experts, routed, counts, expert_of_row=None, kernel=None):
            if counts is None:  # the gathered batch-1 path passes each row's expert instead
                counts = torch.bincount(expert_of_row, minlength=experts.gate_up_proj.shape[0])
            self.expert_rows.append((self._current, int(counts.sum()), int((counts > 0).sum())))
            return real(experts, routed, counts, expert_of_row, kernel)

        monkeypatch.setattr(elastic, "run_experts", counting)

    def _pre(self, block, args):
        hidden, cos, sin, top_k, cache = args
        past = cache.get(block.index)
        self._current = (block.index, hidden.shape[1], top_k, 0 if past is None else past[0].shape[2])
        self.calls.append(self._current)

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("tier, name", [("high", "c00"), ("medium", "c02"), ("low", "c04"), ("high", "c06"),
                                        ("medium", "c08"), ("low", "c16")])
def test_tier_sets_the_crop_budget(backend, tier, name):
    """Crops encoded by the ViT (hook count) and vision tokens follow Molmo's tiling at the tier's max_crops."""
    ref = case(name)
    assert ref["max_crops"] == FIXTURE_TIERS[tier]
    encoded = []
    handle = backend.model.vision.register_forward_pre_hook(lambda m, args: encoded.append(args[0].shape[0]))
    try:
        ep = backend.start_episode(sample_of(ref), tier, budget())
        backend.run_to(ep, 1)
        result = backend.finish(ep, 2, 4)
    finally:
        handle.remove()
    assert encoded == [ref["n_crops"]]
    assert result.extras["grid"] == ref["crop_grid_rows_cols"]
    assert result.extras["vision_tokens"] == ref["n_image_patch_tokens"]
    assert result.extras["prefill_tokens"] == ref["n_tokens"] + 1  # + the budget token


def test_default_tiers_cap_crops_at_the_design_ranges(results_dir):
    backend = MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, max_new_tokens=1)
    crops = {}
    for tier in backend.knob_space.tiers:
        ep = backend.start_episode(sample_of(case("c06")), tier, budget())  # the 400x1400 portrait
        backend.run_to(ep, 1)
        crops[tier] = backend.finish(ep, 2, 4).extras["crops"]
    # grids 2x1, 5x1, 6x2 (+ the global crop): at max_crops 7 the width forces the same downscaling
    # for 5..7 rows, and the rule takes the fewest crops; each tier stays in its design range
    assert crops == {"low": 3, "medium": 6, "high": 13}


@pytest.mark.parametrize("name", ["c00", "c09"])
def test_full_configuration_answers_like_the_reference(backend, name):
    """All blocks at the checkpoint's top-k: the first token is the reference's greedy token, at any budget."""
    ref = case(name)
    tier = next(t for t, m in FIXTURE_TIERS.items() if m == ref["max_crops"])
    for seed in (0, 1):
        ep = backend.start_episode(sample_of(ref), tier, budget(seed) * 10)
        backend.run_to(ep, 1)
        assert backend.finish(ep, backend.cfg.moe_top_k, 4).extras["generated_ids"][0] == ref["greedy_ids"][0]


def test_insertion_top_k_blocks_and_decode(backend, monkeypatch):
    ref = case("c04")
    log = BlockLog(backend, monkeypatch)
    try:
        ep = backend.start_episode(sample_of(ref), "low", budget())
        backend.run_to(ep, 2)
        after_run_to = list(log.calls)
        result = backend.finish(ep, 1, 3)
    finally:
        log.close()
    T = ref["n_tokens"] + 1
    assert result.extras["blocks"] == [0, 1, 3]  # block 2 (least important) skipped
    # run_to: blocks 0..p-1 over the prefill, block 0 at first_block_top_k, block 1 at the model's top-k
    assert after_run_to == [(0, T, 2, 0), (1, T, 2, 0)]
    prefill = [c for c in log.calls if c[1] > 1]
    assert prefill == after_run_to + [(3, T, 1, 0)]  # blocks 0, 1 not recomputed; block 2 never runs
    decode = [c for c in log.calls if c[1] == 1]
    steps = result.extras["generated_tokens"] - 1
    assert steps == 2 and len(decode) == 3 * steps
    # decode: the prefill's blocks and top-k, one new position at a time over the growing cache
    assert decode == [(b, 1, k, T + s) for s in range(steps) for b, k in ((0, 2), (1, 2), (3, 1))]
    # experts computed: exactly top-k rows per token, and at most top-k experts touched per decode token
    for (block, length, k, _), rows, touched in log.expert_rows:
        assert rows == length * k
        if length == 1:
            assert touched == k
    assert all(v > 0 for v in result.timings_ms.values())


def test_budget_token_enters_the_prefill_only(backend):
    ref = case("c12")
    tokens, answers = [], []
    for seed in (0, 1):
        ep = backend.start_episode(sample_of(ref), "low", budget(seed))
        assert ep.hidden.shape[1] == ref["n_tokens"] + 1
        torch.testing.assert_close(ep.hidden[0, -1], backend.embed_budget(budget(seed)))
        tokens.append(backend.run_to(ep, 1))
        result = backend.finish(ep, 2, 4)
        answers.append(result.extras["generated_ids"])
    assert not torch.allclose(tokens[0], tokens[1])  # the latency token reads the budget
    assert answers[0][0] == answers[1][0]  # the first answer token comes from the prompt position


def test_bad_input_is_named(backend, results_dir):
    s = sample_of(case("c12"))
    with pytest.raises(ValueError, match=r"tier='huge' is not known; expected one of \('low', 'medium', 'high'\)"):
        backend.start_episode(s, "huge", budget())
    with pytest.raises(ValueError, match=r"budget_token has shape \(3,\), expected \(32,\)"):
        backend.start_episode(s, "low", torch.zeros(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        backend.start_episode(s, "low", torch.full((32,), float("nan")))
    ep = backend.start_episode(s, "low", budget())
    with pytest.raises(RuntimeError, match="finish called before run_to"):
        backend.finish(ep, 2, 4)
    with pytest.raises(ValueError, match="insertion=5: expected 1..4"):
        backend.run_to(ep, 5)
    backend.run_to(ep, 1)
    with pytest.raises(ValueError, match="top_k=9: expected 1..8"):
        backend.finish(ep, 9, 4)
    with pytest.raises(ValueError, match=r"tier_max_crops\['low'\]=0: expected an int >= 1"):
        MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, tier_max_crops={"low": 0})
    with pytest.raises(ValueError, match="model_path is required for backend 'molmoe'"):
        make_backend("molmoe", results_dir=results_dir)
    with pytest.raises(FileNotFoundError, match=r"block importance file .*importance\.json does not exist"):
        MolmoEBackend(model_path=FIXTURE, results_dir=FIXTURE / "images")
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported"):
        make_backend("molmoe", model_path=FIXTURE, results_dir=results_dir, dtype="int8")


def test_knob_space_and_describe(backend):
    ks = backend.knob_space
    assert ks.tiers == ("low", "medium", "high") and ks.first_block_top_k == backend.cfg.moe_top_k == 2
    assert ks.top_k_values == (1, 2) and ks.num_blocks_values == (1, 2, 3, 4)
    info = backend.describe()
    assert info["tier_max_crops"] == FIXTURE_TIERS and info["backend"] == "MolmoEBackend"


def test_image_size_resizes_before_tiling(results_dir):
    """SynthVQA's 192-px scenes get one grid crop at every tier; at 640x480 the tiers differ."""
    small = MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, num_samples=1, max_new_tokens=1)
    photo = MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, num_samples=1, max_new_tokens=1,
                          image_size=(640, 480))
    s = small.dataset("val")[0]
    crops = {}
    for name, b in (("small", small), ("photo", photo)):
        for tier in ("low", "high"):
            ep = b.start_episode(s, tier, budget())
            b.run_to(ep, 1)
            crops[name, tier] = b.finish(ep, 2, 4).extras["crops"]
    assert crops == {("small", "low"): 2, ("small", "high"): 2, ("photo", "low"): 3, ("photo", "high"): 7}
    with pytest.raises(ValueError, match=r"image_size=\[640\]: expected \[width, height\]"):
        MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, image_size=[640])


def test_official_okvqa_files_in_molmoe_prompt_format(tmp_path, results_dir):
    from envs import make_env
    from envs.data import extract_answer, vqa_accuracy
    from test_vlm_real_data import _write_okvqa

    _write_okvqa(tmp_path / "data")
    backend = MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, dataset_names=("okvqa",),
                            data_root=tmp_path / "data", num_samples={"val": 2}, max_new_tokens=2)
    s = backend.dataset("val")[0]
    assert s.dataset == "okvqa"
    assert backend.prompt(s) == (" User: what color is the big shape?\nAnswer the question using a single word or "
                                 "phrase. Assistant:")
    env = make_env(backend, batch_size=1, group_size=2, split="val")
    td = env.rand_action(env.reset())
    td = env.rand_action(env.step(td)["next"])
    acc = env.step(td)["next", "episode", "accuracy"]
    assert acc.shape == (2, 1) and ((acc >= 0) & (acc <= 1)).all()
    ep = backend.start_episode(s, "low", torch.zeros(32))
    backend.run_to(ep, 1)
    result = backend.finish(ep, 2, 4)
    assert result.accuracy == vqa_accuracy(extract_answer(result.answer), s.answers)


def test_static_decode_answers_what_eager_decode_answers(backend, results_dir):
    """decode_mode 'static' is the CUDA graph's step run eagerly (envs.backends.vlm.executor): on the
    MolmoE port it must generate the eager decoder's ids, with a fixed number of decode steps."""
    static = MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, tier_max_crops=FIXTURE_TIERS,
                           prompt_templates={"synthvqa": "{question}"}, max_new_tokens=3, decode_mode="static")
    assert static.describe()["executor"]["decode"] == "static"
    assert static.describe()["executor"]["prefill_bucket"] is None  # its long prefill stays eager
    for name in ("c00", "c07"):  # landscape and tall portrait
        for insertion, top_k, num_blocks in ((1, 1, 3), (2, 2, 4)):
            ids = []
            for b in (backend, static):
                ep = b.start_episode(sample_of(case(name)), "high", budget())
                b.run_to(ep, insertion)
                result = b.finish(ep, top_k, num_blocks)
                ids.append(result.extras["generated_ids"])
            assert ids[0] == ids[1], (name, insertion, top_k, num_blocks)
            assert result.extras["decode_steps"] == 2
