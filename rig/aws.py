"""moto_server: SQS and ECR (and SNS, EventBridge, IAM for the AWS setup blocks of docs/install.md) over real HTTP."""
from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
import uuid

import boto3
import requests

from rig.common import free_port, wait_for
from rig.faults import FaultProxy

DIGEST_A = "sha256:" + "a" * 64


def moto_server_command() -> str | None:
    """moto_server on PATH, else beside this interpreter (a venv's bin is not always on PATH)."""
    beside = pathlib.Path(sys.executable).parent / "moto_server"
    return shutil.which("moto_server") or (str(beside) if beside.exists() else None)


ECR_TARGET = "AmazonEC2ContainerRegistry_V20150921."
LIFECYCLE_PREVIEW_MAX_RESULTS = 100  # GetLifecyclePolicyPreview's maxResults: "can be between 1 and 100"
CREDENTIAL_REGION = re.compile(r"Credential=[^/]+/[0-9]{8}/([a-z0-9-]+)/")


def wildcard_matches(pattern: str, tag: str) -> bool:
    """An ECR exclusion filter of filterType WILDCARD: `*` matches any run of characters (the ECR API
    Reference, ImageTagMutabilityExclusionFilter; its pattern allows [0-9a-zA-Z._*-] only)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), tag) is not None


def tag_may_move(repository: dict, tag: str) -> bool:
    """Whether ECR lets PutImage move an existing `tag` of this repository (DescribeRepositories' answer):
    IMMUTABLE never, IMMUTABLE_WITH_EXCLUSION only a tag an exclusion filter matches, MUTABLE always,
    MUTABLE_WITH_EXCLUSION all but the tags a filter matches."""
    mutability = repository.get("imageTagMutability") or "MUTABLE"
    excluded = any(f.get("filterType") == "WILDCARD" and wildcard_matches(f.get("filter", ""), tag)
                   for f in repository.get("imageTagMutabilityExclusionFilters") or [])
    return {"IMMUTABLE": False, "IMMUTABLE_WITH_EXCLUSION": excluded, "MUTABLE_WITH_EXCLUSION": not excluded}.get(
        mutability, True)


def tag_selected(selection: dict, tags: list[str]) -> bool:
    """Does a rule's tag selection take an image with these tags? tagStatus untagged: no tags; any: every
    image; tagged: every entry of tagPrefixList (or tagPatternList, `*` a wildcard) matched by one of its tags
    (the Amazon ECR User Guide: "an image is successfully matched if all of the tags in the tagPrefixList
    value are matched against any of the image's tags")."""
    status = selection.get("tagStatus")
    if status == "any":
        return True
    if status == "untagged":
        return not tags
    prefixes = [p + "*" for p in selection.get("tagPrefixList") or []] + list(selection.get("tagPatternList") or [])
    return bool(tags) and bool(prefixes) and all(any(wildcard_matches(p, t) for t in tags) for p in prefixes)


def preview_results(policy: dict, images: list[dict], statuses: dict[str, str], now: float) -> list[dict]:
    """The images a lifecycle policy acts on, as the Amazon ECR User Guide says ECR evaluates one: rules by
    rulePriority, lowest first; an image is acted on by one rule at most; an image a rule's tag selection
    takes is never acted on by a rule of lower priority (a higher rulePriority); imageCountMoreThan counts the
    images the rule selects, youngest first by imagePushedAt, and acts on those past the count;
    sinceImagePushed (countUnit days) on those pushed longer ago. (The rig evaluates these two count types,
    the ones its tests use; moto refuses policies with the others.)"""
    def pushed(image):
        at = image.get("imagePushedAt")  # (a datetime, as boto3 reads moto's answer)
        return at.timestamp() if hasattr(at, "timestamp") else float(at or 0)

    order = {image["imageDigest"]: n for n, image in enumerate(images)}  # pushed in this order (ties: same second)
    claimed, results = set(), []
    for rule in sorted(policy.get("rules") or [], key=lambda r: r["rulePriority"]):
        selection, action = rule["selection"], rule["action"]
        storage = (selection.get("storageClass") or "standard").upper()
        selected = sorted((i for i in images if tag_selected(selection, i.get("imageTags") or [])
                           and (statuses.get(i["imageDigest"]) == "ARCHIVED") == (storage == "ARCHIVE")),
                          key=lambda i: (pushed(i), order[i["imageDigest"]]), reverse=True)
        if selection["countType"] == "imageCountMoreThan":
            acted = selected[selection["countNumber"]:]
        elif selection["countType"] == "sinceImagePushed":
            acted = [i for i in selected if now - pushed(i) > selection["countNumber"] * 86400]
        else:
            acted = []
        for image in acted:
            if image["imageDigest"] not in claimed:
                kind = action["type"].upper()
                results.append({"imageTags": image.get("imageTags") or [], "imageDigest": image["imageDigest"],
                                "imagePushedAt": pushed(image), "appliedRulePriority": rule["rulePriority"],
                                "storageClass": "ARCHIVE" if storage == "ARCHIVE" else "STANDARD",
                                "action": {"type": kind, **({"targetStorageClass": "ARCHIVE"} if kind == "TRANSITION"
                                                            else {})}})
        claimed |= {i["imageDigest"] for i in selected}
    return results


class EcrAsDocumented:
    """The rig's ECR endpoint: moto_server behind a proxy that answers the calls below as ECR documents where
    moto does not, everything else passed through to moto unchanged.

    PutImage of an existing tag at another digest in a tag-immutable repository: moto answers
    ImageAlreadyExistsException; ECR answers ImageTagAlreadyExistsException, HTTP 400 (the Amazon ECR
    API Reference, PutImage, Errors: "ImageTagAlreadyExistsException: The specified image is tagged with
    a tag that already exists. The repository is configured for tag immutability. HTTP Status Code: 400"),
    in the body of an AWS JSON 1.1 error, {"__type": ..., "message": ...} (the AWS JSON 1.1 protocol).
    ImageAlreadyExistsException stays for what ECR answers it: the tag already at this very image.
    Which tags are immutable follows imageTagMutability as ECR documents it, with
    IMMUTABLE_WITH_EXCLUSION's WILDCARD filters (see tag_may_move); moto 5 knows those settings, but
    reads a filter as a regular expression (so a filter that is not a plain tag may differ: the tests
    use plain ones) and refuses a tag excluded under MUTABLE_WITH_EXCLUSION with the same wrong exception,
    which this proxy also answers as ECR.

    ListImages pages: moto answers every image at once, ignoring maxResults and nextToken; ECR answers
    at most maxResults image ids (1 to 1000; 100 when maxResults is not given) and a nextToken while
    more remain, none on the last page (the Amazon ECR API Reference, ListImages, Request Parameters
    maxResults and nextToken, Response Elements nextToken). The listing itself (which images, one entry
    per tag, the tagStatus filter) stays moto's; the token is opaque, as ECR says to treat it.

    Storage classes: moto 5 has neither imageStatus nor UpdateImageStorageClass. This proxy keeps which
    images are archived or being restored (`statuses`; every other image is ACTIVE) and answers
    UpdateImageStorageClass as the Amazon ECR API Reference documents it (UpdateImageStorageClass: request
    imageId, targetStorageClass STANDARD | ARCHIVE; response registryId, repositoryName, imageId and
    imageStatus ACTIVE | ARCHIVED | ACTIVATING; errors ImageNotFoundException, RepositoryNotFoundException,
    ImageStorageClassUpdateNotSupportedException, InvalidParameterException), the image itself looked up
    in moto. A restore takes ECR minutes: the image stays ACTIVATING until the test says the restore is
    done (`restores_done`). DescribeImages of a repository with such images, or asked with an imageStatus
    filter, is moto's answer with each image's imageStatus added and the filter applied (the Amazon ECR
    API Reference, DescribeImagesFilter: "If not specified, only images with ACTIVE status are returned").
    Elsewhere moto's answer lacks imageStatus, as ECR's did before storage classes (the deployer reads
    none as ACTIVE).

    PutImage moving a tag: see move_tag.

    Lifecycle policy previews: moto 5 keeps lifecycle policies (PutLifecyclePolicy, GetLifecyclePolicy: moto's)
    but has neither StartLifecyclePolicyPreview nor GetLifecyclePolicyPreview. This proxy answers them as the
    Amazon ECR API Reference documents (StartLifecyclePolicyPreview: request lifecyclePolicyText, optional,
    "If you do not specify a policy, the current policy for the repository is used"; response status
    IN_PROGRESS; errors LifecyclePolicyNotFoundException, RepositoryNotFoundException.
    GetLifecyclePolicyPreview: response status, previewResults of LifecyclePolicyPreviewResult (imageTags,
    imageDigest, imagePushedAt, action {type EXPIRE | TRANSITION, targetStorageClass}, appliedRulePriority,
    storageClass), summary, nextToken; request maxResults "between 1 and 100", past it a ValidationException
    (ECR checks the range; botocore only the minimum); error LifecyclePolicyPreviewNotFoundException), evaluated at once by
    preview_results, the first Get after a Start answering IN_PROGRESS (ECR takes seconds; the caller must
    poll), with the evaluation rules of the Amazon
    ECR User Guide (Automate the cleanup of images by using lifecycle policies, Lifecycle policy evaluation rules)."""

    def __init__(self, moto_url: str):
        self.moto_url = moto_url
        self.proxy = FaultProxy(moto_url)
        self.proxy.answer = self.answer
        self.url = self.proxy.url
        self.statuses: dict[tuple[str, str, str], str] = {}  # (region, repository, digest) -> ARCHIVED | ACTIVATING
        self.classed: set[tuple[str, str]] = set()  # (region, repository) where an image ever changed class
        self.previews: dict[tuple[str, str], dict] = {}  # (region, repository) -> the last preview's answer

    def answer(self, key: str, headers, body: bytes):
        if key.endswith(" " + ECR_TARGET + "PutImage"):
            return self.put_image(headers, body)
        if key.endswith(" " + ECR_TARGET + "ListImages"):
            return self.list_images(headers, body)
        if key.endswith(" " + ECR_TARGET + "UpdateImageStorageClass"):
            return self.update_image_storage_class(headers, body)
        if key.endswith(" " + ECR_TARGET + "DescribeImages"):
            return self.describe_images(key.split()[1], headers, body)
        if key.endswith(" " + ECR_TARGET + "StartLifecyclePolicyPreview"):
            return self.start_lifecycle_policy_preview(headers, body)
        if key.endswith(" " + ECR_TARGET + "GetLifecyclePolicyPreview"):
            return self.get_lifecycle_policy_preview(headers, body)
        return None

    def start_lifecycle_policy_preview(self, headers, body: bytes):
        request = json.loads(body or b"{}")
        region = CREDENTIAL_REGION.search(headers.get("Authorization") or "")
        reply_headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}
        if not region:
            return None
        ecr = boto3.client("ecr", region_name=region[1], endpoint_url=self.moto_url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        where = {k: request[k] for k in ("registryId", "repositoryName") if request.get(k)}
        try:
            policy = request.get("lifecyclePolicyText") or ecr.get_lifecycle_policy(**where)["lifecyclePolicyText"]
            images = ecr.describe_images(**where)["imageDetails"]  # (moto answers every image at once)
        except ecr.exceptions.ClientError as e:
            return 400, {"__type": e.response["Error"]["Code"], "message": e.response["Error"]["Message"]}, \
                reply_headers
        statuses = {d["imageDigest"]: self.statuses.get((region[1], d["repositoryName"], d["imageDigest"]), "ACTIVE")
                    for d in images}
        results = preview_results(json.loads(policy), images, statuses, time.time())
        registry = images[0]["registryId"] if images else request.get("registryId", "123456789012")
        self.previews[(region[1], request["repositoryName"])] = {
            "registryId": registry, "repositoryName": request["repositoryName"], "lifecyclePolicyText": policy,
            "status": "IN_PROGRESS", "previewResults": results,
            "summary": {"expiringImageTotalCount": sum(r["action"]["type"] == "EXPIRE" for r in results)}}
        return 200, {"registryId": registry, "repositoryName": request["repositoryName"],
                     "lifecyclePolicyText": policy, "status": "IN_PROGRESS"}, reply_headers

    def get_lifecycle_policy_preview(self, headers, body: bytes):
        request = json.loads(body or b"{}")
        region = CREDENTIAL_REGION.search(headers.get("Authorization") or "")
        reply_headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}
        preview = region and self.previews.get((region[1], request.get("repositoryName")))
        if not preview:
            return 400, {"__type": "LifecyclePolicyPreviewNotFoundException",
                         "message": "There is no dry run for this repository"}, reply_headers
        if preview["status"] == "IN_PROGRESS":  # (the next Get finds it done)
            preview["status"] = "COMPLETE"
            return 200, {k: v for k, v in preview.items() if k not in ("previewResults", "summary")} | {
                "status": "IN_PROGRESS"}, reply_headers
        results, page = preview["previewResults"], int(request.get("maxResults") or 100)
        if not 1 <= page <= LIFECYCLE_PREVIEW_MAX_RESULTS:  # (botocore checks only the minimum: ECR the range)
            return 400, {"__type": "ValidationException", "message": f"1 validation error detected: Value '{page}' at "
                         f"'maxResults' failed to satisfy constraint: Member must have value less than or equal to "
                         f"{LIFECYCLE_PREVIEW_MAX_RESULTS}"}, reply_headers
        if request.get("imageIds"):
            wanted = {i.get("imageDigest") for i in request["imageIds"]}
            return 200, {**preview, "previewResults": [r for r in results if r["imageDigest"] in wanted]}, reply_headers
        start = int(request.get("nextToken") or 0)
        reply = {**preview, "previewResults": results[start:start + page]}
        if start + page < len(results):
            reply["nextToken"] = str(start + page)
        return 200, reply, reply_headers

    def restores_done(self) -> None:
        """ECR has finished restoring every image it was restoring: they are ACTIVE again."""
        for key, status in list(self.statuses.items()):
            if status == "ACTIVATING":
                del self.statuses[key]

    def describe_images(self, path: str, headers, body: bytes):
        request = json.loads(body or b"{}")
        region = CREDENTIAL_REGION.search(headers.get("Authorization") or "")
        wanted = (request.get("filter") or {}).get("imageStatus")
        if not region or not (wanted or (region[1], request.get("repositoryName")) in self.classed):
            return None  # every image here ACTIVE, no filter asked: moto's answer is ECR's (but for imageStatus)
        reply = requests.post(self.moto_url + path, data=body, timeout=60, headers={
            k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")})
        document = reply.json() if reply.content else {}
        if reply.ok:
            details = [{**detail, "imageStatus": self.statuses.get(
                (region[1], detail.get("repositoryName"), detail.get("imageDigest")), "ACTIVE")}
                for detail in document.get("imageDetails") or []]
            document["imageDetails"] = [d for d in details if (wanted or "ACTIVE") in ("ANY", d["imageStatus"])]
        return reply.status_code, document, {"Content-Type": "application/x-amz-json-1.1",
                                             "x-amzn-RequestId": str(uuid.uuid4())}

    def update_image_storage_class(self, headers, body: bytes):
        request = json.loads(body or b"{}")
        region = CREDENTIAL_REGION.search(headers.get("Authorization") or "")
        reply_headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}
        target, image_id = request.get("targetStorageClass"), request.get("imageId") or {}
        if not region or target not in ("STANDARD", "ARCHIVE") or not image_id:
            return 400, {"__type": "InvalidParameterException",
                         "message": "Invalid parameter at 'targetStorageClass' or 'imageId'"}, reply_headers
        ecr = boto3.client("ecr", region_name=region[1], endpoint_url=self.moto_url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        where = {k: request[k] for k in ("registryId", "repositoryName") if request.get(k)}
        try:
            detail = ecr.describe_images(**where, imageIds=[image_id])["imageDetails"][0]
        except ecr.exceptions.ClientError as e:
            return 400, {"__type": e.response["Error"]["Code"], "message": e.response["Error"]["Message"]}, \
                reply_headers
        key = (region[1], detail["repositoryName"], detail["imageDigest"])
        self.classed.add(key[:2])
        status = self.statuses.get(key, "ACTIVE")
        if (status, target) == ("ARCHIVED", "STANDARD"):
            self.statuses[key] = "ACTIVATING"
        elif (status, target) == ("ACTIVE", "ARCHIVE"):
            self.statuses[key] = "ARCHIVED"
        else:
            return 400, {"__type": "ImageStorageClassUpdateNotSupportedException",
                         "message": f"The image is {status}: it cannot move to {target}"}, reply_headers
        return 200, {"registryId": detail["registryId"], "repositoryName": detail["repositoryName"],
                     "imageId": {"imageDigest": detail["imageDigest"]}, "imageStatus": self.statuses[key]}, \
            reply_headers

    def list_images(self, headers, body: bytes):
        request = json.loads(body or b"{}")
        region = CREDENTIAL_REGION.search(headers.get("Authorization") or "")
        if not region:
            return None
        ecr = boto3.client("ecr", region_name=region[1], endpoint_url=self.moto_url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            listed = ecr.list_images(**{k: request[k] for k in ("registryId", "repositoryName", "filter")
                                        if request.get(k)})["imageIds"]
        except ecr.exceptions.ClientError:
            return None  # no such repository: moto's answer is ECR's
        page, start = int(request.get("maxResults") or 100), 0
        if request.get("nextToken"):
            try:
                start = int(json.loads(base64.urlsafe_b64decode(request["nextToken"]))["next"])
            except (ValueError, KeyError, TypeError):
                return 400, {"__type": "InvalidParameterException", "message": "Invalid parameter at 'nextToken'"}, {
                    "Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}
        reply = {"imageIds": listed[start:start + page]}
        if start + page < len(listed):
            reply["nextToken"] = base64.urlsafe_b64encode(json.dumps({"next": start + page}).encode()).decode()
        return 200, reply, {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}

    def put_image(self, headers, body: bytes):
        request = json.loads(body or b"{}")
        tag, manifest = request.get("imageTag"), request.get("imageManifest") or ""
        region = CREDENTIAL_REGION.search(headers.get("Authorization") or "")
        if not tag or not region:
            return None
        ecr = boto3.client("ecr", region_name=region[1], endpoint_url=self.moto_url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        where = {"repositoryName": request.get("repositoryName", "")}
        where.update({"registryId": request["registryId"]} if request.get("registryId") else {})
        try:
            repository = ecr.describe_repositories(repositoryNames=[where["repositoryName"]],
                                                   **{k: v for k, v in where.items() if k == "registryId"})
            tagged = ecr.describe_images(**where, imageIds=[{"imageTag": tag}])["imageDetails"]
        except ecr.exceptions.ClientError:
            return None  # no such repository or tag: moto's answer is ECR's
        digest = request.get("imageDigest") or "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
        if not tagged or tagged[0]["imageDigest"] == digest:
            return None
        if tag_may_move(repository["repositories"][0], tag):
            return self.move_tag(ecr, where, tagged[0], headers, body)
        message = (f"The image tag '{tag}' already exists in the '{where['repositoryName']}' repository and cannot "
                   f"be overwritten because the repository is immutable.")
        return 400, {"__type": "ImageTagAlreadyExistsException", "message": message}, {
            "Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}

    def move_tag(self, ecr, where: dict, left: dict, headers, body: bytes):
        """PutImage of a tag that moves to another image: in ECR the image it leaves stays, untagged if that
        was its last tag (what lifecycle rules on tagStatus UNTAGGED expire: the Amazon ECR User Guide,
        Examples of lifecycle policies). moto deletes it with its last tag; it is put back, untagged."""
        kept = None
        if left.get("imageTags") == [json.loads(body)["imageTag"]]:
            kept = ecr.batch_get_image(**where, imageIds=[{"imageDigest": left["imageDigest"]}])["images"][0]
        reply = requests.post(self.moto_url + "/", data=body, timeout=60, headers={
            k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")})
        if reply.ok and kept:
            try:
                ecr.put_image(**where, imageManifest=kept["imageManifest"], imageDigest=left["imageDigest"],
                              **({"imageManifestMediaType": kept["imageManifestMediaType"]}
                                 if kept.get("imageManifestMediaType") else {}))
            except ecr.exceptions.ClientError:
                pass  # moto 5 cannot put an untagged image into a repository with tag exclusion filters: lost there
        return reply.status_code, reply.json() if reply.content else {}, {
            "Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": str(uuid.uuid4())}

    def close(self):
        self.proxy.close()


class Aws:
    """moto_server: SQS and ECR over real HTTP, ECR as documented where moto differs (EcrAsDocumented)."""

    def __init__(self, workdir: pathlib.Path, region: str = "us-east-1"):
        self.port = free_port()  # moto_server's own
        self.moto_url = f"http://127.0.0.1:{self.port}"
        self.front = EcrAsDocumented(self.moto_url)
        self.url = self.front.url
        self.region = region
        self.log = open(workdir / "moto.log", "ab")
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": region,  # as the README says
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.proc = None
        self.start()
        self.sqs = self.client("sqs", region)

    @classmethod
    def attach(cls, url: str, region: str) -> Aws:
        """The moto_server another process started (the demo's, for `python3 -m rig push`)."""
        aws = cls.__new__(cls)
        aws.url, aws.region, aws.proc = url, region, None
        aws.sqs = aws.client("sqs", region)
        return aws

    def start(self):
        # A session of its own: Ctrl-C in the demo's terminal reaches the demo, which stops the rig in order.
        self.proc = subprocess.Popen([moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._up, 30, what="moto_server")

    def stop(self):
        """moto_server stops (its state with it); the endpoint in front stays, as a real one's address does."""
        self.proc.terminate()
        self.proc.wait(10)

    def _up(self):
        try:
            return requests.get(self.moto_url + "/moto-api/", timeout=1).ok
        except requests.RequestException:
            return False

    def client(self, service: str, region: str = "us-east-1"):
        return boto3.client(service, region_name=region, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_queue(self, name: str | None = None, **attributes) -> str:
        name = name or f"q-{uuid.uuid4().hex[:12]}"
        return self.sqs.create_queue(QueueName=name, Attributes={k: str(v) for k, v in attributes.items()})["QueueUrl"]

    def send(self, queue_url: str, *bodies) -> None:
        for body in bodies:
            self.sqs.send_message(QueueUrl=queue_url, MessageBody=body if isinstance(body, str) else json.dumps(body))

    def put_image(self, account: str, region: str, repository: str, tag: str, content: str) -> str:
        """An image in ECR only, not in a registry: enough for services without replicas, which never
        pull, at a fraction of a real push's cost. Returns its digest."""
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                               "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 0,
                                          "digest": "sha256:" + hashlib.sha256(content.encode()).hexdigest()},
                               "layers": []})
        digest = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
        self.client("ecr", region).put_image(registryId=account, repositoryName=repository, imageManifest=manifest,
                                             imageTag=tag, imageDigest=digest)
        return digest

    def set_scan(self, account: str, region: str, repository: str, digest: str, status: str = "COMPLETE",
                 counts: dict | None = None, again: bool = False, completed: bool | None = None) -> None:
        """Scan the image (StartImageScan) and make DescribeImageScanFindings answer this status and these
        counts, with imageScanCompletedAt if `completed` (by default: for COMPLETE and ACTIVE; enhanced
        scanning answers COMPLETE without it until its findings are in). moto keeps the first answer it gave
        for an image, so to change it (`again`: IN_PROGRESS, then COMPLETE) the image is put anew first,
        same manifest, digest and tags: a fresh image to moto."""
        ecr = self.client("ecr", region)
        image_id = {"imageDigest": digest}
        if again:
            tags = ecr.describe_images(registryId=account, repositoryName=repository,
                                       imageIds=[image_id])["imageDetails"][0].get("imageTags", [])
            manifest = ecr.batch_get_image(registryId=account, repositoryName=repository,
                                           imageIds=[image_id])["images"][0]["imageManifest"]
            ecr.batch_delete_image(registryId=account, repositoryName=repository, imageIds=[image_id])
            for tag in tags or [None]:  # (an index's platform image is untagged: put by digest alone)
                ecr.put_image(registryId=account, repositoryName=repository, imageManifest=manifest,
                              imageDigest=digest, **({"imageTag": tag} if tag else {}))
        findings = {"findingSeverityCounts": counts or {}}
        if status in ("COMPLETE", "ACTIVE") if completed is None else completed:
            findings["imageScanCompletedAt"] = time.time()  # a JSON timestamp, as ECR sends it
        result = {"registryId": account, "repositoryName": repository, "imageId": image_id,
                  "imageScanStatus": {"status": status, "description": f"moto says {status}"},
                  "imageScanFindings": findings}
        requests.post(self.url + "/moto-api/static/ecr/scan-finding-results",
                      json={"results": [result], "account_id": account, "region": region}, timeout=10).raise_for_status()
        ecr.start_image_scan(registryId=account, repositoryName=repository, imageId=image_id)
        # moto hands a posted result to the first image of the repository asked about whose digest, or TAG,
        # matches: for untagged images (an index's platform and attestation manifests) None matches None,
        # so one untagged image could take another's. Asking now binds the answer to this image for good.
        ecr.describe_image_scan_findings(registryId=account, repositoryName=repository, imageId=image_id)

    def queue_depth(self, queue_url: str) -> int:
        """Messages still on the queue, visible or in flight."""
        attrs = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def event(account="123456789012", region="us-east-1", repository="team/web", tag="latest",
          digest=DIGEST_A, action="PUSH", result="SUCCESS", **top) -> dict:
    """An EventBridge "ECR Image Action" event, shaped as ECR sends it."""
    detail = {"result": result, "repository-name": repository, "image-digest": digest,
              "action-type": action, "image-tag": tag}
    body = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "ECR Image Action",
            "source": "aws.ecr", "account": account, "time": "2026-11-16T01:54:34Z",
            "region": region, "resources": [], "detail": detail}
    body.update(top)
    return body


def scan_event(account="123456789012", region="us-east-1", repository="team/web", digest=DIGEST_A,
               tags=("latest",), status="COMPLETE", counts=None, **top) -> dict:
    """An EventBridge "ECR Image Scan" event, shaped as ECR sends it (samples/ecr-scan.json)."""
    detail = {"scan-status": status, "repository-name": repository, "image-digest": digest,
              "finding-severity-counts": counts or {}, "image-tags": list(tags) if isinstance(tags, tuple) else tags}
    body = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "ECR Image Scan",
            "source": "aws.ecr", "account": account, "time": "2026-11-16T02:10:00Z", "region": region,
            "resources": [f"arn:aws:ecr:{region}:{account}:repository/{repository}"], "detail": detail}
    body.update(top)
    return body


def referrer_event(account="123456789012", region="us-east-1", repository="team/web", digest=DIGEST_A,
                   artifact="application/vnd.cncf.notary.signature", **top) -> dict:
    """An EventBridge "ECR Referrer Action" event: a signature (a referrer, `digest` its own) pushed,
    shaped as ECR sends it (samples/referrer-push.json). It names no subject."""
    detail = {"result": "SUCCESS", "repository-name": repository, "image-digest": digest, "action-type": "PUSH",
              "manifest-media-type": "application/vnd.oci.image.manifest.v1+json", "artifact-media-type": artifact}
    body = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "ECR Referrer Action", "source": "aws.ecr",
            "account": account, "time": "2026-11-16T02:05:41Z", "region": region, "resources": [], "detail": detail}
    body.update(top)
    return body
