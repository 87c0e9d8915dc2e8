"""Scale-out on Ray Serve: replicas that each own a loraplex engine on the shared base model, adapters loaded on
demand from a shared adapter store with ``@serve.multiplexed``, an OpenAI-compatible ingress, and training fan-out.

    from loraplex.distributed import AdapterStore, RaySettings, init_ray, start_app
    init_ray()                                  # private Ray on loopback (or init_ray("auto") to join a cluster)
    url = start_app(RaySettings(base="/models/base", store=AdapterStore.of("/srv/adapters"), replicas=2))

Needs the optional extra ``loraplex[ray]``; importing this package does not import Ray.
"""

from loraplex.distributed.naming import adapters_of, model_id_for
from loraplex.distributed.settings import RaySettings
from loraplex.distributed.store import AdapterStore, StoreCatalog

__all__ = ["AdapterStore", "RaySettings", "StoreCatalog", "adapters_of", "build_app", "init_ray", "model_id_for",
           "ray_train", "start_app", "stop"]


def __getattr__(name: str):  # Ray-dependent parts load on first use
    if name == "build_app":
        from loraplex.distributed.deployments import build_app

        return build_app
    if name in ("init_ray", "start_app", "stop"):
        from loraplex.distributed import cluster

        return getattr(cluster, name)
    if name == "ray_train":
        from loraplex.distributed.train import ray_train

        return ray_train
    raise AttributeError(name)
