"""Frozen-feature evaluation (util.feature_eval, main_finetune --knn, main_pretrain --knn_freq):
the k-NN votes against a brute-force count in NumPy, the linear probe against an independent
bound on its objective, the sharded evaluation against one process, the monitor's curve against
--knn on the same weights, and every method's encoder."""
import os
import sys

import numpy as np
import pytest
import torch

from helpers import read_jsonl, run_finetune, run_pretrain, run_script
from util import feature_eval
from util.errors import UsageError
from util.feature_eval import encoder_as_classifier, evaluate_features, knn_votes, train_linear_probe
from util.registry import create_pretrain_model

TINY_VIT = ('--model', 'vit_tiny_patch8', '--input_size', 64)


def brute_force_votes(bank, bank_labels, queries, num_classes, k, temperature):
    """Each query's k most cosine-similar bank rows, by a full sort, voting exp(sim / T) or 1."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    votes = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        similarity = bank @ query
        for i in np.argsort(-similarity)[:k]:
            votes[q, bank_labels[i]] += np.exp(similarity[i] / temperature) if temperature else 1.0
    return votes


@pytest.mark.parametrize('temperature', [0.07, None])
def test_knn_votes_are_a_brute_force_count(monkeypatch, temperature):
    """Each k counted apart in NumPy; the votes of every k from one search for the largest."""
    rng = np.random.default_rng(0 if temperature else 1)
    bank, queries = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
    bank_labels = rng.integers(0, 7, 300)
    monkeypatch.setattr(feature_eval, 'SIMILARITY_ELEMENTS', 300 * 7)  # chunks of 7 queries
    votes = knn_votes(torch.tensor(bank, dtype=torch.float32), torch.tensor(bank_labels),
                      torch.tensor(queries, dtype=torch.float32), 7, (5, 1, 20), temperature)
    assert list(votes) == [5, 1, 20]
    for k in (1, 5, 20):
        expected = brute_force_votes(bank, bank_labels, queries, 7, k, temperature)
        np.testing.assert_allclose(votes[k].numpy(), expected, rtol=1e-4)


def test_knn_accuracy_counts_the_brute_force_winners():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 8))
    bank_labels, query_labels = rng.integers(0, 8, 400), rng.integers(0, 8, 100)
    bank = centres[bank_labels] + rng.normal(size=(400, 8))
    queries = centres[query_labels] + rng.normal(size=(100, 8))
    results = evaluate_features(torch.tensor(bank, dtype=torch.float32), torch.tensor(bank_labels),
                                torch.tensor(queries, dtype=torch.float32), torch.tensor(query_labels), 8,
                                ks=(10, 3), probe=False)
    for k in (10, 3):
        for suffix, temperature in (('', 0.07), ('_majority', None)):
            votes = brute_force_votes(bank, bank_labels, queries, 8, k, temperature)
            label_votes = votes[np.arange(100), query_labels]
            above = (votes > label_votes[:, None]).sum(axis=1)  # classes voted for more than the label
            tied = (votes == label_votes[:, None]).sum(axis=1) - 1  # others as many (majority votes tie)
            for rank, name in ((1, 'acc1'), (5, 'acc5')):
                surely, maybe = above + tied < rank, above < rank  # the label among the first `rank`
                accuracy = results[f'knn{k}{suffix}_{name}']
                assert 100 * np.mean(surely) <= accuracy <= 100 * np.mean(maybe), (k, suffix, name)
            if temperature:  # weighted votes do not tie, except at zero (classes no neighbour voted for)
                assert not tied[label_votes > 0].any()
    assert results['knn_acc1'] == results['knn10_acc1'] and results['images'] == 100
    assert results['knn10_acc1'] > 60  # clusters one standard deviation wide around 8 random centres


def test_a_k_past_the_training_set_takes_all_of_it_and_says_so(capsys):
    from util.feature_eval import print_results
    rng = np.random.default_rng(1)
    bank, queries = torch.tensor(rng.normal(size=(30, 8)), dtype=torch.float32), torch.tensor(rng.normal(size=(9, 8)))
    results = evaluate_features(bank, torch.tensor(rng.integers(0, 3, 30)), queries.float(),
                                torch.tensor(rng.integers(0, 3, 9)), 3, ks=(30, 1000), probe=False)
    for suffix in ('', '_majority'):
        for name in ('acc1', 'acc5'):
            assert results[f'knn1000{suffix}_{name}'] == results[f'knn30{suffix}_{name}']
    print_results(dict(results, train_images=30, feature_dim=8, seconds=0.0), (30, 1000))
    out = capsys.readouterr().out
    assert 'k-NN, k=30, majority vote' in out and 'k-NN, k=1000 (all 30 training images), majority vote' in out
    assert 'Acc@5 counts' not in out
    # k = 2: two classes at most get votes, so a third in its top-5 is one without any (said)
    results = evaluate_features(bank, torch.tensor(rng.integers(0, 3, 30)), queries.float(),
                                torch.tensor(rng.integers(0, 3, 9)), 3, ks=(2,), probe=False)
    print_results(dict(results, train_images=30, feature_dim=8, seconds=0.0), (2,))
    assert capsys.readouterr().out.count('k-NN, k=2 (fewer than 5 neighbours: Acc@5 counts classes without a '
                                         'vote)') == 2


def logistic_objective(features, labels, weight, bias):
    """scikit-learn's LogisticRegression(C=1) objective divided by N, in float64: the mean
    cross-entropy + |W|^2 / (2 N)."""
    logits = features @ weight.T + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean() + (weight ** 2).sum() / (2 * len(labels))


def test_probe_converges_on_separable_features():
    """Three separable clusters: the probe classifies every feature right, and its objective is
    at or below that of the best scaling of the class means as weights (a value found by a
    search in NumPy, independent of the optimizer: the optimum can only be lower)."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 100)
    features = 4 * np.eye(3, 6)[labels] + 0.3 * rng.normal(size=(300, 6)) + 5  # offset: standardising matters
    probe, loss = train_linear_probe(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), 3)
    standardised = (features - features.mean(0)) / features.std(0, ddof=1)
    means = np.stack([standardised[labels == c].mean(0) for c in range(3)])
    bound = min(logistic_objective(standardised, labels, scale * means, np.zeros(3))
                for scale in np.linspace(0, 20, 401))
    weight, bias = probe.linear.weight.detach().double().numpy(), probe.linear.bias.detach().double().numpy()
    assert loss == pytest.approx(logistic_objective(standardised, labels, weight, bias), rel=1e-4)
    assert loss <= bound + 1e-5, (loss, bound)
    predictions = probe(torch.tensor(features, dtype=torch.float32)).argmax(1).numpy()
    assert (predictions == labels).all()


def test_on_the_demo_trained_features_beat_random_ones(demo_root, demo_finetuning, tmp_path):
    """What the numbers are for: the demo fine-tuning's encoder (29 % top-1 as a classifier)
    against the same network with random weights, both well above chance (10 %), on a bank of the
    first 100 training images of each class and all 500 validation images. Measured: k-NN 33.6 %
    against 20.8 %, the probe 44.4 % against 36.2 % (500 images: 1 % is 5 images). Short MIM
    pre-trainings do not beat random weights on the demo (the README's table): the property is
    checked on features trained for the task."""
    _, finetuning = demo_finetuning
    subset = tmp_path / 'demo_subset'
    for split, count in (('train', 100), ('val', None)):
        for class_dir in sorted(os.listdir(os.path.join(demo_root, split))):
            (subset / split / class_dir).mkdir(parents=True)
            for name in sorted(os.listdir(os.path.join(demo_root, split, class_dir)))[:count]:
                os.symlink(os.path.join(demo_root, split, class_dir, name), subset / split / class_dir / name)
    common = ['--model', 'vit_tiny_patch8', '--input_size', 32, '--data_path', subset, '--num_workers', 0,
              '--device', 'cpu', '--batch_size', 250]  # the size demo_finetuning trains at
    trained = run_finetune('--knn', *common, '--finetune', finetuning / 'checkpoint-best.pth',
                           '--output_dir', tmp_path / 'trained')
    random = run_finetune('--knn', *common, '--output_dir', tmp_path / 'random')
    assert (trained['images'], trained['train_images']) == (500, 1000)
    assert trained['knn_acc1'] > random['knn_acc1'] + 4 and trained['probe_acc1'] > random['probe_acc1']
    assert min(random['knn_acc1'], random['probe_acc1']) > 15


def test_every_methods_encoder_gives_features():
    """The encoder of each tiny pre-training model, as the monitor and --knn see it, loaded with
    every encoder weight (a missing one is an error), gives one finite feature vector an image."""
    images = torch.randn(2, 3, 64, 64)
    for name in ('mae_vit_tiny', 'simmim_vit_tiny', 'simmim_swin_tiny', 'maskfeat_vit_tiny', 'mae_hivit_tiny'):
        model = create_pretrain_model(name)
        classifier = encoder_as_classifier(model).eval()
        with torch.no_grad():
            features = classifier(images)
        assert features.dim() == 2 and len(features) == 2 and torch.isfinite(features).all(), name


def test_monitor_logs_the_knn_curve_that_knn_gives_for_the_same_weights(small_folder, tmp_path, capsys):
    # several k: each logged (only the first was, said the help of both tools)
    run_pretrain('--model', 'mae_vit_tiny', '--data_path', small_folder, '--batch_size', 16, '--epochs', 3,
                 '--warmup_epochs', 0, '--blr', 1e-3, '--knn_freq', 2, '--knn_k', 20, 5, '--num_workers', 0,
                 '--device', 'cpu', '--output_dir', tmp_path / 'pre')
    epochs = read_jsonl(tmp_path / 'pre' / 'log.txt')
    assert [('knn_acc1' in r, 'knn_seconds' in r) for r in epochs] == [(True, True), (False, False), (True, True)]
    monitored = [r for r in read_jsonl(tmp_path / 'pre' / 'log.jsonl') if 'knn_acc1' in r]
    assert [(r['epoch'], r['step']) for r in monitored] == [(0, 4), (2, 12)]  # 64 images in batches of 16
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / 'pre'), size_guidance={'scalars': 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars('epoch/knn_acc1')] == \
        [(r['epoch'], pytest.approx(r['knn_acc1'])) for r in monitored]
    # a stop signal during the k-NN pass after epoch 0 ends it (it waited for the pass over both splits); the resumed
    # run measures the kept epoch as the uninterrupted run did
    from util import signals
    from util.errors import Preempted
    flags = ['--model', 'mae_vit_tiny', '--data_path', small_folder, '--batch_size', 16, '--epochs', 3,
             '--warmup_epochs', 0, '--blr', 1e-3, '--knn_freq', 2, '--knn_k', 20, 5, '--num_workers', 0,
             '--device', 'cpu', '--output_dir', tmp_path / 'stopped']
    with pytest.MonkeyPatch.context() as patch:
        extracting = []  # the agreement at each batch of a feature pass, after its count of batches
        patch.setattr(signals, 'fewest_over_ranks', lambda count: extracting.append(count) or count)
        patch.setattr(signals, 'stop_agreed', lambda: bool(extracting))
        with pytest.raises(Preempted, match='in the evaluation after an epoch, whose training is kept'):
            run_pretrain(*flags)
    assert not (tmp_path / 'stopped' / 'log.txt').exists()
    run_pretrain(*flags, '--max_steps', 1)
    first = read_jsonl(tmp_path / 'stopped' / 'log.txt')[0]
    assert (first['epoch'], first['knn_acc1'], first['knn5_acc1']) == \
        (0, epochs[0]['knn_acc1'], epochs[0]['knn5_acc1'])
    results = run_finetune('--knn', *TINY_VIT, '--finetune', tmp_path / 'pre' / 'checkpoint-last.pth', '--data_path',
                           small_folder, '--knn_k', 20, 5, '--num_workers', 0, '--device', 'cpu', '--output_dir',
                           tmp_path / 'knn')
    for key in ('knn_acc1', 'knn_acc5', 'knn20_acc1', 'knn5_acc1', 'knn5_acc5'):
        assert results[key] == monitored[-1][key], key
    assert epochs[-1]['knn5_acc1'] == results['knn5_acc1']
    assert read_jsonl(tmp_path / 'knn' / 'log.txt')[0]['probe_acc1'] == results['probe_acc1']
    out = capsys.readouterr().out
    assert 'k=20, k=5: top-1' in out
    assert out.rstrip().endswith(f"appended to {tmp_path / 'knn' / 'log.txt'}")


def test_two_processes_evaluate_like_one(small_folder, tmp_path):
    """Each rank extracts its shard of 64 training and 17 validation images (9 and 8); the gathered
    training features and the summed counts give the results of one process."""
    common = ['main_finetune.py', '--knn', *TINY_VIT, '--data_path', small_folder, '--knn_k', 5, 20, '--num_workers',
              0, '--device', 'cpu', '--batch_size', 8]
    # a k given twice is measured once (its votes were counted twice: a RuntimeError after the feature pass)
    run_finetune(*common[1:], '--knn_k', 5, 5, 20, '--output_dir', tmp_path / 'one')
    two = run_script(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', 2, *common,
                     '--output_dir', tmp_path / 'two')
    assert two.returncode == 0, two.stderr[-2000:]
    first, second = (read_jsonl(tmp_path / run / 'log.txt')[0] for run in ('one', 'two'))
    assert second['images'] == first['images'] == 17 and second['train_images'] == first['train_images'] == 64
    for key in [k for k in first if k.startswith(('knn', 'probe_acc'))]:
        assert second[key] == pytest.approx(first[key], abs=1e-6), key


def test_a_rank_without_images_gives_no_rows_of_the_features_width(small_folder):
    """More processes than images (18 over the 17 validation images): the last rank's shard is empty,
    and its features are 0 rows of ViT-Ti's 192 for the gathering (was torch.cat's error on no batches)."""
    from types import SimpleNamespace
    from util.datasets import SeededSamples, build_eval_loader, build_image_folder, eval_transform
    from util.device import resolve_device
    from util.dist import World
    from util.registry import create_classifier
    samples = SeededSamples(build_image_folder(small_folder, 'val', eval_transform(32)), 0)
    model = create_classifier('vit_tiny_patch8', img_size=32, num_classes=0).eval()
    args, device = SimpleNamespace(batch_size=8, num_workers=0), resolve_device('cpu')
    shards = [build_eval_loader(samples, World(rank=rank, world_size=18), args, False, distributed=True)
              for rank in (0, 17)]
    (features, labels), (no_features, no_labels) = (feature_eval.extract_features(model, shard, device, 'fp32')
                                                    for shard in shards)
    assert features.shape == (1, 192) and no_features.shape == (0, 192)
    assert labels.shape == (1,) and no_labels.shape == (0,) and no_labels.dtype == labels.dtype


def test_bad_knn_input_is_one_line(small_folder, tmp_path):
    with pytest.raises(UsageError, match='--knn evaluates the frozen features .* leave out --eval'):
        run_finetune('--knn', '--eval', *TINY_VIT, '--data_path', small_folder, '--output_dir', tmp_path)
    with pytest.raises(UsageError, match=r'^--knn measures the weights of --finetune \(a pre-training or fine-tuning '
                                         r'checkpoint\), not --resume: give --finetune x.pth$'):  # random weights
        run_finetune('--knn', '--resume', 'x.pth', *TINY_VIT, '--data_path', small_folder, '--output_dir', tmp_path)
    with pytest.raises(UsageError, match='--knn_k must be 1 or more'):
        run_finetune('--knn', '--knn_k', 0, *TINY_VIT, '--data_path', small_folder, '--output_dir', tmp_path)
    with pytest.raises(UsageError, match=r'--knn_freq must be 0 \(off\) or more, got -1'):
        run_pretrain('--model', 'mae_vit_tiny', '--data_path', small_folder, '--knn_freq', -1, '--device', 'cpu',
                     '--output_dir', tmp_path)
    assert not os.path.isfile(tmp_path / 'log.txt')
