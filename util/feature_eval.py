"""How good are an encoder's frozen features? k-nearest neighbours and a linear probe.

Both classify the validation images from features extracted once, with the evaluation
transform, by an encoder that is not trained further:
- k-NN (DINO's monitor): each validation feature takes the k training features of highest
  cosine similarity, which vote for their classes with weight exp(similarity / T) (T = 0.07),
  or one vote each (`majority`). Computed a chunk of queries at a time, each chunk's similarity
  matrix about 1 GiB at most, so that ImageNet's 1.28 M training features fit.
- The linear probe: multinomial logistic regression on the standardised features, trained to
  convergence by L-BFGS over the whole training set (the features are cached: no augmentation,
  no re-extraction per epoch), with scikit-learn's default L2 penalty (C = 1: |W|^2 / 2 against the
  summed cross-entropy). Seconds on small sets; unlike MAE's --linprobe recipe (LARS, 90 epochs of
  ImageNet), it does not depend on a long schedule to say what the features are worth.

During pre-training, `KnnMonitor` (main_pretrain --knn_freq) measures the k-NN accuracy of the
encoder's current weights every few epochs: a curve of what the representation is worth, which
the reconstruction loss does not give.

With several processes each rank extracts its shard of each split (util.datasets.ShardSampler);
the training features are gathered on every rank, each rank classifies its own validation
images, and the correct counts are summed: the accuracy is exact over the whole split.
"""
import time

import torch
import torch.nn.functional as F

from util import dist
from util.checkpoint import load_pretrained_state
from util.datasets import SeededSamples, build_eval_loader, build_image_folder, eval_transform, number_of_classes
from util.engine import batches_until_stopped, model_input, to_device, topk_correct
from util.errors import UsageError
from util.export import timm_encoder_of
from util.images import AlreadyCounted
from util.lr_sched import due_at_epoch
from util.registry import create_classifier

TEMPERATURE = 0.07  # DINO's
SIMILARITY_ELEMENTS = 2 ** 28  # floats in one chunk's (queries, training features) matrix: 1 GiB


def add_knn_k_argument(parser):
    parser.add_argument('--knn_k', type=int, nargs='+', default=[20],
                        help='neighbours of the k-NN evaluation; several give one result each, the first is '
                             'knn_acc1 (default: %(default)s; DINO reports 10 20 100 200)')


def feature_loaders(args, world, pin_memory, beside_training=False):
    """Loaders of train/ and val/ under the evaluation transform (--input_size), each rank its
    shard, their workers started for each pass (between two measurements of the pre-training
    monitor, epochs apart, they would idle beside the training loader's). An unreadable image is an
    error, but `beside_training` (the monitor) replaces those of train/ as the training does (it
    names and counts them): the bank's other images measure the features as well, and a k-NN curve
    should not stop a run that the training keeps going. returns: (train loader, val loader,
    number of classes: --nb_classes or train/'s)"""
    if min(args.knn_k) < 1:
        raise UsageError(f'--knn_k must be 1 or more, got {" ".join(map(str, args.knn_k))}')
    args.knn_k = list(dict.fromkeys(args.knn_k))  # a k given twice is measured once (its votes were doubled)
    if getattr(args, 'knn_freq', 0) < 0:
        raise UsageError(f'--knn_freq must be 0 (off) or more, got {args.knn_freq}')

    def samples(split):
        replaced = AlreadyCounted() if split == 'train' and beside_training else None
        return SeededSamples(build_image_folder(args.data_path, split, eval_transform(args.input_size)), args.seed,
                             bad_images=replaced)

    loaders = [build_eval_loader(samples(split), world, args, pin_memory, distributed=True, persistent=False)
               for split in ('train', 'val')]
    folders = [loader.dataset.dataset for loader in loaders]
    return (*loaders, number_of_classes(*(f.classes for f in folders), getattr(args, 'nb_classes', None)))


@torch.no_grad()
def extract_features(model, loader, device, precision, stoppable=False):
    """The model's outputs for this rank's images (a classifier built with num_classes=0 gives its
    pooled features), in float32 on the device; `stoppable` as util.engine.evaluate's.
    returns: (features (N, D), labels (N,))"""
    model.eval()
    dev = device.torch_device
    features, labels = [], []
    for images, targets in batches_until_stopped(loader, stoppable):
        with device.autocast(precision):
            features.append(model(model_input(to_device(images, dev))).float())
        labels.append(to_device(targets, dev))
    if not features:  # more processes than images: this rank's shard is empty; the width from one image
        image, _ = loader.dataset[(0, 0)]
        with device.autocast(precision):
            width = model(model_input(to_device(image[None], dev))).shape[1]
        return torch.zeros(0, width, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    return torch.cat(features), torch.cat(labels)


def knn_votes(bank, bank_labels, queries, num_classes, ks, temperature=TEMPERATURE):
    """For each k of `ks`, the class votes of each query's k most cosine-similar bank features:
    exp(similarity / temperature) each, or 1 each with temperature None (a majority vote). The
    neighbours are searched once, for the largest k; a smaller k takes the first of them.
    bank: (N, D), bank_labels: (N,), queries: (Q, D) -> {k: (Q, num_classes) float32}"""
    bank = F.normalize(bank, dim=1)
    votes = {k: [] for k in ks}
    for chunk in queries.split(max(1, SIMILARITY_ELEMENTS // len(bank))):
        similarity, nearest = (F.normalize(chunk, dim=1) @ bank.T).topk(min(max(ks), len(bank)), dim=1)
        weights = (similarity / temperature).exp() if temperature else torch.ones_like(similarity)
        labels = bank_labels[nearest]
        for k in ks:
            chunk_votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
            votes[k].append(chunk_votes.scatter_add_(1, labels[:, :k], weights[:, :k]))
    return {k: torch.cat(chunks) for k, chunks in votes.items()}


class LinearProbe(torch.nn.Module):
    """A linear classifier on standardised features (the training features' mean and std)."""

    def __init__(self, mean, std, num_classes):
        super().__init__()
        self.register_buffer('mean', mean)
        self.register_buffer('std', std)
        self.linear = torch.nn.Linear(len(mean), num_classes, device=mean.device)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, features):
        return self.linear((features - self.mean) / self.std)


def train_linear_probe(features, labels, num_classes, max_iter=1000):
    """Logistic regression to convergence: L-BFGS (strong Wolfe line search) from zero weights on
    the mean cross-entropy + |W|^2 / (2 N), scikit-learn's LogisticRegression(C=1) objective divided
    by N. The loss is summed a chunk of features at a time, so any number of features fits.
    returns: (LinearProbe, its final training loss)"""
    probe = LinearProbe(features.mean(0), features.std(0).clamp_min(1e-6), num_classes)
    optimizer = torch.optim.LBFGS(probe.linear.parameters(), max_iter=max_iter, history_size=20,
                                  line_search_fn='strong_wolfe', tolerance_grad=1e-6, tolerance_change=1e-10)
    rows = max(1, SIMILARITY_ELEMENTS // 8 // num_classes)

    def objective():
        optimizer.zero_grad()
        total = probe.linear.weight.square().sum() / (2 * len(features))
        total.backward()
        total = total.detach()
        for chunk, chunk_labels in zip(features.split(rows), labels.split(rows)):
            loss = F.cross_entropy(probe(chunk), chunk_labels, reduction='sum') / len(features)
            loss.backward()
            total += loss.detach()
        return total

    with torch.enable_grad():
        optimizer.step(objective)
        loss = objective()
    return probe, loss.item()


@torch.no_grad()
def evaluate_features(bank, bank_labels, queries, query_labels, num_classes, ks=(20,), probe=True):
    """k-NN for each k in `ks` (weighted and majority) and the linear probe, for this rank's
    validation features against the training features of all ranks (`bank`).
    returns: {'knn{k}_acc1', 'knn{k}_acc5', 'knn{k}_majority_acc1', ..., 'probe_acc1', 'probe_acc5',
    'probe_loss', 'images'}; the first k's weighted vote is also 'knn_acc1' and 'knn_acc5'"""
    correct, names = [], []
    for suffix, temperature in (('', TEMPERATURE), ('_majority', None)):
        for k, votes in knn_votes(bank, bank_labels, queries, num_classes, ks, temperature).items():
            correct.append(topk_correct(votes, query_labels))
            names.append(f'knn{k}{suffix}')
    results = {}
    if probe:
        linear, results['probe_loss'] = train_linear_probe(bank, bank_labels, num_classes)
        correct.append(topk_correct(linear(queries), query_labels))
        names.append('probe')
    counts = dist.all_reduce_sum(torch.cat([*correct, torch.tensor([len(queries)], device=queries.device)]))
    counts = counts.tolist()
    images = max(counts[-1], 1)
    for i, name in enumerate(names):
        results[f'{name}_acc1'], results[f'{name}_acc5'] = (100 * c / images for c in counts[2 * i:2 * i + 2])
    results['knn_acc1'], results['knn_acc5'] = results[f'knn{ks[0]}_acc1'], results[f'knn{ks[0]}_acc5']
    results['images'] = int(counts[-1])
    return results


def frozen_feature_accuracy(model, train_loader, val_loader, device, precision, num_classes, ks=(20,),
                            probe=True, stoppable=False):
    """Extract the features of both splits with `model`, gather the training ones on every rank,
    and evaluate them (`evaluate_features`); 'seconds' and 'train_images' are added. `stoppable`:
    a stop signal ends the extraction (pre-training's pass after an epoch, util.engine.evaluate's)."""
    start = time.perf_counter()
    bank, bank_labels = extract_features(model, train_loader, device, precision, stoppable)
    bank, bank_labels = dist.all_gather_rows(bank), dist.all_gather_rows(bank_labels)
    queries, query_labels = extract_features(model, val_loader, device, precision, stoppable)
    results = evaluate_features(bank, bank_labels, queries, query_labels, num_classes, ks, probe)
    results.update(train_images=len(bank), feature_dim=bank.shape[1], seconds=round(time.perf_counter() - start, 1))
    return results


def print_results(results, ks):
    """Lines in the `* Acc@1 X Acc@5 Y` format of evaluation, one per classifier."""
    print(f"frozen features ({results['feature_dim']}-d) of {results['train_images']} training images, "
          f"{results['images']} validation images, {results['seconds']:.1f} s:")
    for k in ks:
        # a k past the training set takes all of it (knn_votes): the majority is then the commonest class
        k_text = f'k={k}' if k <= results['train_images'] else f"k={k} (all {results['train_images']} training images)"
        if k < 5:  # at most k classes get a vote: the rest of a top-5 is drawn from ties at zero
            k_text += ' (fewer than 5 neighbours: Acc@5 counts classes without a vote)'
        print(f"* Acc@1 {results[f'knn{k}_acc1']:.3f} Acc@5 {results[f'knn{k}_acc5']:.3f}  "
              f"k-NN, {k_text}, votes weighted by exp(cos / {TEMPERATURE})")
        print(f"* Acc@1 {results[f'knn{k}_majority_acc1']:.3f} Acc@5 {results[f'knn{k}_majority_acc5']:.3f}  "
              f"k-NN, {k_text}, majority vote")
    if 'probe_acc1' in results:
        print(f"* Acc@1 {results['probe_acc1']:.3f} Acc@5 {results['probe_acc5']:.3f}  linear probe "
              f"(logistic regression to convergence, training loss {results['probe_loss']:.4f})")


def encoder_as_classifier(model):
    """The encoder of a pre-training model, with its current weights, as main_finetune --knn sees a
    checkpoint of it: the timm model its model file exports the encoder to (util.export), without
    a head, average-pooled (main_finetune's default --global_pool), loaded as --finetune loads."""
    name, kwargs, state = timm_encoder_of(model)
    classifier = create_classifier(name, num_classes=0, **{**kwargs, 'global_pool': 'avg'})
    load_pretrained_state(classifier, state, 'the weights being pre-trained')
    return classifier


class KnnMonitor:
    """Pre-training: every `every` epochs and at the last, the k-NN accuracy (weighted vote) of the
    encoder's current weights on val/, with train/ as the reference, under the evaluation
    transform. Called as the loop's after_epoch hook on every rank; returns knn_acc1, knn_acc5 (the
    first of `ks`), knn<k>_acc1 and knn<k>_acc5 for each k where there are several, and
    knn_seconds, for log.txt (and TensorBoard's epoch scalars), and appends them to log.jsonl at
    the global step."""

    def __init__(self, model, loaders, device, precision, num_classes, ks, every, epochs, logger, progress):
        self.model, self.loaders, self.device, self.precision = model, loaders, device, precision
        self.num_classes, self.ks, self.every, self.epochs = num_classes, ks, every, epochs
        self.logger, self.progress = logger, progress

    def __call__(self, epoch, stats):
        if not due_at_epoch(epoch, self.every, self.epochs):
            return {}
        classifier = encoder_as_classifier(self.model).to(self.device.torch_device)
        results = frozen_feature_accuracy(classifier, *self.loaders, self.device, self.precision, self.num_classes,
                                          self.ks, probe=False, stoppable=True)
        values = {'knn_acc1': results['knn_acc1'], 'knn_acc5': results['knn_acc5']}
        if len(self.ks) > 1:
            values.update({f'knn{k}_acc{n}': results[f'knn{k}_acc{n}'] for k in self.ks for n in (1, 5)})
        values['knn_seconds'] = results['seconds']
        others = ''.join(f", k={k}: top-1 {values[f'knn{k}_acc1']:.2f}%" for k in self.ks[1:])
        print(f"k-NN accuracy of the encoder after epoch {epoch}: top-1 {values['knn_acc1']:.2f}%, top-5 "
              f"{values['knn_acc5']:.2f}% (k={self.ks[0]}{others}; {results['train_images']} training images, "
              f"{values['knn_seconds']:.1f} s)")
        self.logger.log_values({'epoch': epoch, 'step': self.progress.step, **values})
        return values
