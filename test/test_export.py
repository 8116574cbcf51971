"""export.py: every method's pre-training checkpoint, and a fine-tuned classifier, as a safetensors file
that the printed timm.create_model call loads, computing what the checkpoint's own model computes."""
import os
import re

import pytest
import timm
import torch
from safetensors import safe_open

from helpers import run_main
from util.errors import UsageError, run_cli
from util.registry import create_classifier, create_pretrain_model


def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def save_checkpoint(tmp_path, name, model, **args):
    """A checkpoint in this project's layout, {'model': ..., 'args': {'model': name, ...}}."""
    path = tmp_path / f'{name}.pth'
    torch.save({'model': model.state_dict(), 'args': {'model': name, 'input_size': 64, **args}}, path)
    return path


def pretraining_checkpoint(tmp_path, name, **kwargs):
    torch.manual_seed(0)
    model = create_pretrain_model(name, **kwargs).eval()
    return model, save_checkpoint(tmp_path, name, model)


def test_the_printed_call_names_the_file_wherever_it_is_run(tmp_path, capsys, monkeypatch):
    """--output rel.safetensors printed file='rel.safetensors': the call worked only from that folder."""
    _, path = pretraining_checkpoint(tmp_path, 'mae_vit_tiny')
    monkeypatch.chdir(tmp_path)
    _, code = export(capsys, path, 'rel.safetensors')
    assert f"file={str(tmp_path / 'rel.safetensors')!r}" in code


def export(capsys, checkpoint, output, *flags):
    """Run export.py in-process; returns the model built by the call it prints (in eval mode) and the call."""
    run_main('export', '--checkpoint', checkpoint, '--output', output, *flags)
    printed = capsys.readouterr().out
    code = printed.split('Load it with:\n', 1)[1]
    assert 'create_model(' in code and f'file={os.path.abspath(output)!r}' in code, printed
    with safe_open(output, 'pt') as f:  # the encoder only
        assert not [k for k in f.keys() if k.startswith(('mask_token', 'decoder'))]
    namespace = {}
    exec(code, namespace)  # the call, as a user copies it
    return namespace['model'].eval(), code


@torch.no_grad()
def test_mae_encoder(tmp_path, capsys):
    mae, path = pretraining_checkpoint(tmp_path, 'mae_vit_tiny')
    umask = os.umask(0o027)
    try:
        model, code = export(capsys, path, tmp_path / 'mae.safetensors')
    finally:
        os.umask(umask)
    # the mode of any file made under that umask (safetensors alone makes 0600: shared weights nobody else reads)
    assert (tmp_path / 'mae.safetensors').stat().st_mode & 0o777 == 0o640
    assert "'vit_tiny_patch16_224'" in code and 'img_size=64, patch_size=8' in code  # timm's own ViT
    assert 'custom_load=False' in code  # timm's weights of that name are .npz: timm 1.0.12 would read the file so
    imgs = images()
    in_order = torch.linspace(0, 0.9, mae.num_patches).expand(2, -1)  # no masking, the patches in order
    latent, _, _ = mae.forward_encoder(imgs, mask_ratio=0, noise=in_order)  # (N, 1 + L, D) after norm
    torch.testing.assert_close(model.forward_features(imgs), latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(imgs), latent[:, 0], rtol=1e-5, atol=1e-5)  # token pooling


@torch.no_grad()
def test_official_mae_encoder_release_with_model(tmp_path, capsys):
    """An encoder-only release (mae_pretrain_vit_*.pth: {'model': encoder}, no args) with --model."""
    torch.manual_seed(0)
    mae = create_pretrain_model('mae_vit_tiny').eval()
    torch.save({'model': {k: v for k, v in mae.state_dict().items() if k in mae.encoder_keys()}},
               tmp_path / 'release.pth')
    with pytest.raises(UsageError, match='does not say which model wrote it: pass --model'):
        run_main('export', '--checkpoint', tmp_path / 'release.pth', '--output', tmp_path / 'x.safetensors')
    model, _ = export(capsys, tmp_path / 'release.pth', tmp_path / 'mae.safetensors', '--model', 'mae_vit_tiny')
    imgs = images()
    latent, _, _ = mae.forward_encoder(imgs, 0, noise=torch.linspace(0, 0.9, mae.num_patches).expand(2, -1))
    torch.testing.assert_close(model.forward_features(imgs), latent, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize('name', ['simmim_vit_tiny', 'maskfeat_vit_tiny'])
def test_simmim_vit_and_maskfeat_encoders(tmp_path, capsys, name):
    pretraining, path = pretraining_checkpoint(tmp_path, name)
    model, code = export(capsys, path, tmp_path / 'encoder.safetensors')
    imgs = images()
    expected = pretraining.encoder.forward_masked(imgs, torch.zeros(2, 8, 8))  # nothing masked
    features = model.forward_features(imgs)[:, 1:]  # (N, 1 + L, D): the patch tokens
    if name == 'simmim_vit_tiny':  # SimMIM's encoder gives (N, D, H, W)
        assert "'beit_base_patch16_224'" in code and "global_pool='token'" in code
        features = features.transpose(1, 2).reshape(expected.shape)
    else:
        assert "'vit_tiny_patch16_224'" in code
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_hivit_encoder(tmp_path, capsys):
    mae, path = pretraining_checkpoint(tmp_path, 'mae_hivit_tiny')
    model, code = export(capsys, path, tmp_path / 'hivit.safetensors')
    assert 'import models_hivit' in code and "'hivit_tiny_patch8_64'" in code and 'rpe=False' in code
    imgs = images()
    expected = mae.forward_features(imgs)  # the main stage's tokens
    torch.testing.assert_close(model.forward_features(imgs), expected, rtol=1e-5, atol=1e-5)
    # pooled: the mean through fc_norm, which starts as the identity
    torch.testing.assert_close(model(imgs), torch.nn.functional.layer_norm(expected.mean(1), (192,), eps=1e-6),
                               rtol=1e-5, atol=1e-5)


def timm_1_0_12_swin_filter(state_dict, model):
    """The layout rule of timm 1.0.12's Swin filter: a state dict without 'head.fc.weight' is taken
    for the original layout, and each patch merging moves one stage on (timm 1.0.31 asks for
    'layers.0.downsample.reduction.weight' instead)."""
    original = 'head.fc.weight' not in state_dict
    out = {}
    for k, v in state_dict.items():
        if original:
            k = re.sub(r'layers.(\d+).downsample', lambda x: f'layers.{int(x.group(1)) + 1}.downsample', k)
            k = k.replace('head.', 'head.fc.')
        out[k] = v
    return out


@torch.no_grad()
def test_simmim_swin_encoder_under_either_rule_of_timm(tmp_path, capsys, monkeypatch):
    """The exported Swin encoder is in the original layout, which the rules of timm 1.0.31 and
    1.0.12 both convert; fine-tuning from this project's own (timm-layout, headless) SimMIM
    checkpoint works under either rule too."""
    from timm.models import swin_transformer
    from util.checkpoint import load_pretrained
    pretraining, path = pretraining_checkpoint(tmp_path, 'simmim_swin_tiny')
    model, code = export(capsys, path, tmp_path / 'swin.safetensors')
    assert "'swin_tiny_patch4_window7_224'" in code and 'img_size=64, window_size=4' in code
    imgs = images()
    expected = pretraining.encoder.forward_masked(imgs, torch.zeros(2, 16, 16))  # (N, D, H, W), nothing masked
    torch.testing.assert_close(model.forward_features(imgs).permute(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(swin_transformer, 'checkpoint_filter_fn', timm_1_0_12_swin_filter)
    namespace = {}
    exec(code, namespace)
    features = namespace['model'].eval().forward_features(imgs).permute(0, 3, 1, 2)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    classifier = create_classifier('swin_tiny_patch4_window4_64', num_classes=10)
    load_pretrained(classifier, str(path))
    for stage in (1, 2, 3):
        torch.testing.assert_close(classifier.layers[stage].downsample.reduction.weight,
                                   pretraining.encoder.layers[stage].downsample.reduction.weight)


@torch.no_grad()
def test_finetuned_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    classifier = create_classifier('vit_tiny_patch8', num_classes=10).eval()
    path = save_checkpoint(tmp_path, 'vit_tiny_patch8', classifier, global_pool=True)
    model, code = export(capsys, path, tmp_path / 'classifier.safetensors')
    assert 'import models_vit' in code and "'vit_tiny_patch8'" in code and 'num_classes=10' in code
    torch.testing.assert_close(model(images()), classifier(images()), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_ema_weights_of_a_classifier_export_with_model_ema(tmp_path, capsys):
    torch.manual_seed(0)
    classifier, average = (create_classifier('vit_tiny_patch8', num_classes=10).eval() for _ in range(2))
    path = tmp_path / 'ema.pth'
    torch.save({'model': classifier.state_dict(), 'model_ema': average.state_dict(),
                'args': {'model': 'vit_tiny_patch8', 'input_size': 64, 'global_pool': True}}, path)
    model, _ = export(capsys, path, tmp_path / 'ema.safetensors', '--model_ema')
    torch.testing.assert_close(model(images()), average(images()), rtol=1e-5, atol=1e-5)
    model, _ = export(capsys, path, tmp_path / 'weights.safetensors')  # without the flag: the weights
    torch.testing.assert_close(model(images()), classifier(images()), rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match='holds no EMA weights'):
        run_main('export', '--checkpoint', save_checkpoint(tmp_path, 'vit_tiny_patch8', classifier), '--output',
                 tmp_path / 'none.safetensors', '--model_ema')


@torch.no_grad()
def test_a_convolutional_classifier_trained_at_another_size_exports(tmp_path, capsys):
    """A ResNet fine-tuned at 64 px records input_size 64, which its timm call must not carry (a
    ResNet takes no img_size: the export was refused as weights that 'do not load')."""
    torch.manual_seed(0)
    classifier = timm.create_model('resnet18', num_classes=10).eval()
    path = save_checkpoint(tmp_path, 'resnet18', classifier)  # input_size 64, below resnet18's 224
    model, code = export(capsys, path, tmp_path / 'resnet.safetensors')
    assert "'resnet18'" in code and 'img_size' not in code and 'num_classes=10' in code
    torch.testing.assert_close(model(images()), classifier(images()), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize('name', ['mae_vit_tiny', 'mae_hivit_tiny'])
def test_a_checkpoint_that_records_no_image_size_exports_with_input_size(tmp_path, capsys, name):
    """Weights alone (an official release, a converted checkpoint) of a run at 96 px: the mismatch of
    the position tables names the size, and --input_size 96 exports an encoder that computes what the
    pre-training model's computes at 96 px."""
    torch.manual_seed(0)
    mae = create_pretrain_model(name, img_size=96).eval()
    path = tmp_path / 'weights.pth'
    torch.save({'model': mae.state_dict()}, path)
    # 96 px = 12 x 12 patches of 8 px: 144 rows (+ a class token for the ViT)
    with pytest.raises(UsageError, match=r'pos_embed.*; its position table is for 96 px images: give --input_size '
                                         r'96$'):
        run_main('export', '--checkpoint', path, '--output', tmp_path / 'no.safetensors', '--model', name)
    model, code = export(capsys, path, tmp_path / 'encoder.safetensors', '--model', name, '--input_size', '96')
    assert 'img_size=96' in code
    imgs = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    if name == 'mae_hivit_tiny':
        expected = mae.forward_features(imgs)
    else:
        in_order = torch.linspace(0, 0.9, mae.num_patches).expand(2, -1)  # no masking, the patches in order
        expected = mae.forward_encoder(imgs, mask_ratio=0, noise=in_order)[0]
    torch.testing.assert_close(model.forward_features(imgs), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_classifier_that_records_no_image_size_exports_with_input_size(tmp_path, capsys):
    torch.manual_seed(0)
    classifier = create_classifier('vit_tiny_patch8', num_classes=10, img_size=96).eval()
    path = tmp_path / 'classifier.pth'
    torch.save({'model': classifier.state_dict()}, path)
    with pytest.raises(UsageError, match=r'; its position table is for 96 px images: give --input_size 96$'):
        run_main('export', '--checkpoint', path, '--output', tmp_path / 'no.safetensors', '--model', 'vit_tiny_patch8')
    model, code = export(capsys, path, tmp_path / 'classifier.safetensors', '--model', 'vit_tiny_patch8',
                         '--input_size', '96')
    imgs = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(imgs), classifier(imgs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['simmim_swin_tiny', 'swin_tiny_patch4_window4_64'])
def test_a_checkpoint_that_records_its_size_is_exported_at_that_size(tmp_path, name):
    """--input_size other than the size a run recorded is refused for every family: a Swin's relative position
    tables (a SimMIM pre-training's, a fine-tuned classifier's) were resampled to 128 px without a word, where a
    ViT's position table does not load."""
    model = (create_pretrain_model(name) if name.startswith('simmim') else create_classifier(name, num_classes=10))
    path = save_checkpoint(tmp_path, name, model)  # recorded: --input_size 64
    with pytest.raises(UsageError, match=re.escape(f"--input_size 128: '{path}' was trained at 64 px (its run's "
                                                   f"--input_size), and export.py writes it at that size: leave "
                                                   f"--input_size out")):
        run_main('export', '--checkpoint', path, '--output', tmp_path / 'x.safetensors', '--input_size', '128')
    assert os.listdir(tmp_path) == [path.name]


@torch.no_grad()
def test_linear_probe_head_is_folded(tmp_path, capsys):
    """A linear probe's BatchNorm + linear head becomes one linear layer with the same logits."""
    from main_finetune import add_probe_head
    torch.manual_seed(0)
    probe = create_classifier('vit_tiny_patch8', num_classes=10, global_pool='token')
    add_probe_head(probe)
    bn = probe.head[0]
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    probe.eval()
    path = save_checkpoint(tmp_path, 'vit_tiny_patch8', probe, linprobe=True, global_pool=False)
    model, code = export(capsys, path, tmp_path / 'probe.safetensors')
    assert "global_pool='token'" in code
    torch.testing.assert_close(model(images()), probe(images()), rtol=1e-5, atol=1e-5)


def test_bad_input_is_one_line(tmp_path, capsys):
    model, _ = pretraining_checkpoint(tmp_path, 'mae_vit_tiny', depth=1)
    # norm_pix_loss recorded, as main_pretrain records MAE's: built into another --model's, it was the error
    path = save_checkpoint(tmp_path, 'mae_vit_tiny', model, norm_pix_loss=True)
    out = tmp_path / 'x.safetensors'
    with pytest.raises(UsageError, match=r'must end in \.safetensors'):
        run_main('export', '--checkpoint', path, '--output', tmp_path / 'x.pth')
    with pytest.raises(UsageError, match=r'has no name before \.safetensors'):  # it wrote a hidden file
        run_main('export', '--checkpoint', path, '--output', tmp_path / '.safetensors')
    with pytest.raises(UsageError, match='does not exist'):
        run_main('export', '--checkpoint', tmp_path / 'missing.pth', '--output', out)
    with pytest.raises(UsageError, match='does not fit'):  # 1 block, where mae_vit_tiny has 12
        run_main('export', '--checkpoint', path, '--output', out)
    with pytest.raises(UsageError, match="unknown model 'mae_vit_tny' \\(closest: mae_vit_tiny"):
        run_main('export', '--checkpoint', path, '--output', out, '--model', 'mae_vit_tny')
    with pytest.raises(UsageError, match='not a SimMIM checkpoint'):
        run_main('export', '--checkpoint', path, '--output', out, '--model', 'simmim_vit_tiny')
    with pytest.raises(UsageError, match='does not fit.*; it was written by --model mae_vit_tiny: leave --model out$'):
        run_main('export', '--checkpoint', path, '--output', out, '--model', 'mae_vit_small')
    assert os.listdir(tmp_path) == [path.name]  # nothing written, no temporary file left
    # as the command line ends it (util.errors.run_cli): one line on stderr, exit code 2, no traceback
    import export
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        run_cli(export.main, export.get_args_parser().parse_args(['--checkpoint', str(path), '--output', str(out)]))
    lines = capsys.readouterr().err.splitlines()
    assert ended.value.code == 2 and len(lines) == 1 and lines[0].startswith('error: '), lines


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    _, path = pretraining_checkpoint(tmp_path, 'mae_vit_tiny')
    a_file = tmp_path / 'file'
    a_file.write_text('')
    for output, reason in ((a_file / 'x.safetensors', 'File exists'),  # its folder would be a file
                           ('/proc/self/x.safetensors', 'No such file or directory')):  # not even root writes there
        with pytest.raises(UsageError, match=f'^cannot write {output} \\({reason}\\): choose another --output$'):
            run_main('export', '--checkpoint', path, '--output', output)


def test_weights_that_do_not_load_into_the_printed_call_are_refused(tmp_path, monkeypatch):
    """The file is loaded with the call before it is put in place: a timm form that does not fit
    (here a wrong one registered for MAE) is one line, and nothing is written."""
    import models_mae
    from util import export
    _, path = pretraining_checkpoint(tmp_path, 'mae_vit_tiny')
    wrong = lambda model: ('vit_small_patch16_224', {}, model.state_dict())  # noqa: E731
    monkeypatch.setitem(export._TIMM_ENCODERS, models_mae.MaskedAutoencoderViT, wrong)
    with pytest.raises(UsageError, match='do not load into vit_small_patch16_224'):
        run_main('export', '--checkpoint', path, '--output', tmp_path / 'x.safetensors')
    assert os.listdir(tmp_path) == [path.name]


def test_project_classifiers_need_a_file_for_pretrained_weights():
    """The project's timm factories load weights only from a file: nothing is downloaded."""
    import models_hivit  # noqa: F401
    with pytest.raises(RuntimeError, match='No pretrained weights exist for hivit_tiny_patch8_64'):
        timm.create_model('hivit_tiny_patch8_64', pretrained=True)
