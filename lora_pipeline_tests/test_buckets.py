from lora_pipeline.core.datasets.buckets import bucket_resolutions, select_bucket


def test_buckets_for_512_match_kohya():
    resos = bucket_resolutions(512, 256, 1024, 64)
    assert resos == sorted(resos)
    assert resos[:9] == [
        (256, 832),
        (256, 896),
        (256, 960),
        (256, 1024),
        (320, 704),
        (320, 768),
        (384, 640),
        (448, 576),
        (512, 512),
    ]
    assert len(resos) == 17
    for w, h in resos:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and (h, w) in resos


def test_each_image_lands_in_the_bucket_of_closest_aspect_ratio():
    resos = bucket_resolutions(512, 256, 1024, 64)
    assert select_bucket(1024, 768, resos) == (576, 448)
    assert select_bucket(768, 1024, resos) == (448, 576)
    assert select_bucket(2000, 2000, resos) == (512, 512)
    assert select_bucket(320, 768, resos) == (320, 768)  # an exact bucket size is kept
    assert select_bucket(4000, 100, resos) == (1024, 256)  # extreme ratios clamp to the last bucket


def test_resolution_is_a_parameter():
    assert (1024, 1024) in bucket_resolutions(1024, 512, 2048, 64)
    assert select_bucket(1024, 768, bucket_resolutions(1024, 512, 2048, 64)) == (1152, 896)
