"""The real test rig of ecr-deploy, shared by the tests, the benchmark and the demo.

Every part is a real component started on this machine (as root), never a mock:
  aws.py        moto_server: SQS and ECR over HTTP (boto3 reaches it through AWS_ENDPOINT_URL)
  registry.py   TLS docker-registry servers answering as ECR hostnames and demanding the ECR
                token, and images built in Python and pushed to them (mirrored into moto's ECR)
  swarm.py      a private dockerd in swarm mode (own data root, exec root and socket), on the
                current engine (Docker 28 from unstable.py) or the host's (bookworm's 20.10)
  deployer.py   ecr_deploy.py run as operators run it: a separate process
  faults.py     real HTTP hops in front of moto or dockerd that fail or stall chosen requests
  unstable.py   programs newer than the host's (Docker 28, containerd 2, notation, cosign),
                unpacked from Debian's unstable archive into .rig/, never installed
  signing.py    signing identities made by notation and cosign, signatures in the registries,
                the forgeries a signature gate must refuse, and the verify commands a deployer runs
  demo.py       the Quick start demo
  __main__.py   `python3 -m rig demo|test|push`: installs what the rig needs (Debian packages,
                and Python packages in a venv, .venv) with the standard library only, then runs

This file imports nothing: `python3 -m rig` must start on a bare Debian python3.
"""
