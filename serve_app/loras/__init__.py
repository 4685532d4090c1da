"""LoRAs: a request's source becomes checked bytes, then an adapter in a pipeline (sources, the one

downloader, the hub, the download cache, file checks, the adapter cache). No Ray.
"""
