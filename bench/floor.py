#!/usr/bin/env python3
"""The memory floor that bench.py measures ecr_deploy.py against, side by side in the same run:
a bare process that imports what the deployer cannot do without (botocore, requests-unixsocket),
makes the same four calls it makes to start working (GetQueueUrl, ReceiveMessage,
GetAuthorizationToken, GET /version), says "ready" and waits to be measured.

    python3 bench/floor.py QUEUE_NAME DOCKER_SOCKET   # AWS_REGION, AWS_ENDPOINT_URL as for the deployer
"""
import os
import sys
import time
import urllib.parse

import botocore.session
import requests_unixsocket


def main() -> None:
    queue, docker_socket = sys.argv[1:3]
    session = botocore.session.get_session()
    session.set_config_variable("region", os.environ["AWS_REGION"])
    sqs = session.create_client("sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    session.create_client("ecr").get_authorization_token()
    docker = "http+unix://" + urllib.parse.quote(docker_socket, safe="")
    requests_unixsocket.Session().get(docker + "/version", timeout=10).raise_for_status()
    print("ready", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
