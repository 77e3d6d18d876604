"""Bluesky in the loop: a RunEngine's Fermat scan reconstructed live, the result steering the scan.

* :mod:`.devices`: simulated ophyd motors and an area detector whose frames come from the ptychography simulator;
* :mod:`.scan`: the plan (``bluesky.plans.spiral_fermat``), the Kafka publisher, the feedback agent;
* :mod:`.feedback`, :mod:`.quality`: the stop rule and the quality documents (pure);
* :mod:`.live`: the per-scan live reconstruction on the stream driver's MPI world, and the whole loop;
* :mod:`.tiled`: a local Tiled server and the results written to it.

The document stream itself (documents in, frames out) is :mod:`sparkmpi.stream.bluesky_docs`; its Kafka
adapter :mod:`sparkmpi.stream.bluesky_bridge`.  Importing this package imports neither bluesky nor ophyd.
"""
