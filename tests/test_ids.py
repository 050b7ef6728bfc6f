from hub.ids import IdGenerator, id_time_ms, is_id, new_id


def test_ids_sort_in_creation_order_even_within_one_millisecond() -> None:
    gen = IdGenerator()
    ids = [gen.new(now_ms=1_700_000_000_000) for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000


def test_ids_keep_order_when_the_clock_steps_back() -> None:
    gen = IdGenerator()
    first = gen.new(now_ms=1_700_000_000_500)
    second = gen.new(now_ms=1_700_000_000_000)
    assert second > first


def test_ids_carry_their_time_and_have_ulid_shape() -> None:
    gen = IdGenerator()
    value = gen.new(now_ms=1_700_000_000_123)
    assert is_id(value)
    assert id_time_ms(value) == 1_700_000_000_123
    assert is_id(new_id())
    assert not is_id("not-an-id")
