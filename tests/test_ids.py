import random

from hub.ids import _ALPHABET, IdGenerator, id_time_ms, is_id, new_id


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


def test_ulid_encoding_is_crockford_base32_of_all_128_bits() -> None:
    from hub.ids import _encode, _encode_ulid

    rng = random.Random(7)
    values = [0, 1, (1 << 128) - 1, 1 << 80, (1 << 48) - 1 << 80]
    values += [rng.getrandbits(128) for _ in range(2000)]
    for value in values:
        text = _encode_ulid(value)
        assert text == _encode(value, 26)
        # Read back character by character: the same number.
        assert sum(_ALPHABET.index(ch) << 5 * (25 - i) for i, ch in enumerate(text)) == value


def test_a_generator_continues_after_an_id_from_an_earlier_one() -> None:
    first = IdGenerator()
    last = [first.new() for _ in range(50)][-1]
    second = IdGenerator()
    second.continue_after(last)
    # Even with its clock behind the first generator's, the new one never goes back.
    assert second.new(now_ms=id_time_ms(last) - 1000) > last
    assert second.new() > last
