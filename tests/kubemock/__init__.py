"""Test harness: Kubernetes and Pulsar admin APIs emulated with kmock, and Kopf in a thread.

- `emulator.KubeEmulator`: a Kubernetes API server (kmock's KubernetesEmulator, made
  strict where Kopf, kubectl and the kubernetes client care); its docstring lists what it
  does and, above all, what it does not do.
- `pulsar_admin.PulsarAdminEmulator`: Pulsar's `/admin/v2` REST API for topics.
- `accounting.RequestLog`: on both, request counting since a mark, and fault injection.
- `operator_thread.OperatorThread`: Kopf in its own thread and event loop.
- `fixtures`: the pytest fixtures `kube`, `pulsar_admin`, `run_operator`, and `wait_for`.

Enable the fixtures with `pytest_plugins = ["kubemock.fixtures"]` in tests/conftest.py.
A test of the operator then reads:

    def test_quickstart_gets_its_topics(kube, pulsar_admin, run_operator):
        system = yaml.safe_load(QUICKSTART.read_text())
        system["spec"]["events"]["adminUrl"] = pulsar_admin.url
        objects = kubernetes.client.CustomObjectsApi(kube.api_client)
        run_operator("recsys_operator.controller.handlers")
        objects.create_namespaced_custom_object(
            "recsys.dev", "v1alpha1", "default", "recommendersystems", system
        )

        def condition(kind):
            body = objects.get_namespaced_custom_object(
                "recsys.dev", "v1alpha1", "default", "recommendersystems", "quickstart"
            )
            found = [c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind]
            return found[0] if found else {}

        wait_for(lambda: condition("TopicsReady").get("status") == "True")
        mark = kube.emulator.mark()
        ...  # make the operator reconcile again, wait for its reads
        writes = kube.emulator.writes_since(mark, exclude=("events",))
        assert not writes, describe(writes)
"""
