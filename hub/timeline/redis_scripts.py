"""The Lua scripts of the Redis store: each one is the atomic step of one store write.

Every script touches the keys of one hash tag only (KEYS[1] is the tag's key base,
`<prefix>:{c:<tag>}`), so it runs unchanged on a single Redis and on Redis Cluster.
The key layout under a base B (see hub/timeline/redis.py for why it looks like this):

  B:seq            newest id prefix minted under this tag (22 chars; the tag is the rest)
  B:ev             hash event id -> "<customer>\\x1f<conversation>\\x1f<json body>",
                   or "@<customer>" when the event moved to that customer's tag (merge)
  B:dl             hash event id -> JSON {s, e, x}: delivery state/error/external id
                   written by record_delivery (overrides the body's)
  B:cv:<conv>      hash of one conversation (og: the customer it was created for),
                   or {mv = customer} when it moved away
  B:ce:<conv>      zset (all scores 0, so ordered by id) of the conversation's events
  B:cu:<cust>      hash of one customer: nm tg ca mi mev act lock
  B:ci:<cust>      list of identities "<1|0>|<kind>|<value>", in the order added
  B:cc:<cust>      set of the customer's conversation ids
  B:tl:<cust>      zset (scores 0) of every event of the customer: the timeline
  B:x:<cust>       hash "<channel>\\x1f<external id>" -> event id (idempotency)
  B:th:<cust>      hash thread key -> space-separated conversation ids
  B:mb:<cust>      set of customers merged (directly or not) into this one
  B:mg:<cust>      hash source customer -> JSON record of what its merge moved here

Optional values travel as "" (none) or "=" followed by the value.
"""

from __future__ import annotations

PRELUDE = r"""
local US = '\31'
local ALPHA = '0123456789ABCDEFGHJKMNPQRSTVWXYZ'

-- The next id prefix: base32 "+1", carrying to the left.
local function inc(s)
  local chars = {}
  for k = 1, #s do chars[k] = s:sub(k, k) end
  local i = #s
  while i >= 1 do
    local pos = string.find(ALPHA, chars[i], 1, true)
    if pos < 32 then
      chars[i] = ALPHA:sub(pos + 1, pos + 1)
      return table.concat(chars)
    end
    chars[i] = '0'
    i = i - 1
  end
  error('id space exhausted')
end

local function opt(a)
  if a == nil or a == '' then return nil end
  return a:sub(2)
end

-- nil when `cand` may be used: it must sort after every id minted under this tag, or
-- the order of ids within a conversation would no longer be the commit order.
local function seq_conflict(B, cand)
  local seq = redis.call('GET', B .. ':seq')
  if seq and cand <= seq then return seq end
  return nil
end

-- The prefix to mint from: the caller's candidate if it is free, else the next free one
-- (or, strict, nil and the newest prefix: the caller wrote entries ahead for `cand`).
local function mint_from(B, cand, strict)
  local seq = seq_conflict(B, cand)
  if not seq then return cand, nil end
  if strict then return nil, seq end
  return inc(seq), nil
end

local function bump_seq(B, prefix)
  local seq = redis.call('GET', B .. ':seq')
  if (not seq) or prefix > seq then redis.call('SET', B .. ':seq', prefix) end
end

local function customer_pack(B, cid)
  return {redis.call('HGETALL', B .. ':cu:' .. cid),
          redis.call('LRANGE', B .. ':ci:' .. cid, 0, -1)}
end

local function event_pack(B, eid)
  return {eid, redis.call('HGET', B .. ':ev', eid), redis.call('HGET', B .. ':dl', eid)}
end

-- An event with what a Recorded needs beside it: its conversation and its customer.
local function recorded_pack(B, eid)
  local pack = event_pack(B, eid)
  if (not pack[2]) or pack[2]:sub(1, 1) == '@' then return {pack} end
  local cid, conv = string.match(pack[2], '^([^\31]*)\31([^\31]*)\31')
  local cv = {}
  if conv ~= '' then cv = redis.call('HGETALL', B .. ':cv:' .. conv) end
  return {pack, cv, customer_pack(B, cid)}
end

local function put_event(B, eid, cid, conv, body)
  redis.call('HSET', B .. ':ev', eid, cid .. US .. (conv or '') .. US .. body)
  redis.call('ZADD', B .. ':tl:' .. cid, 0, eid)
  if conv and conv ~= '' then redis.call('ZADD', B .. ':ce:' .. conv, 0, eid) end
end

local function internal_body(kind, author, now, data)
  return cjson.encode({channel = '', direction = 'internal', kind = kind, author = author,
                       created_at = now, text = '', data = data})
end

local function newest_event(B, conv)
  local ids = redis.call('ZREVRANGEBYLEX', B .. ':ce:' .. conv, '+', '-', 'LIMIT', 0, 1)
  if #ids == 0 then return '' end
  return ids[1]
end

-- Shared checks of every write on a conversation: where it is, who owns it, and
-- whether that customer is in the middle of a merge.
local function conv_owner(B, conv)
  local c = redis.call('HMGET', B .. ':cv:' .. conv, 'cu', 'mv')
  if c[2] then return nil, {'moved', c[2]} end
  if not c[1] then return nil, {'missing'} end
  local lock = redis.call('HGET', B .. ':cu:' .. c[1], 'lock')
  if lock then return nil, {'locked', lock} end
  return c[1], nil
end

local function add_word(key, field, word)
  local cur = redis.call('HGET', key, field)
  if not cur then
    redis.call('HSET', key, field, word)
    return
  end
  for w in string.gmatch(cur, '%S+') do
    if w == word then return end
  end
  redis.call('HSET', key, field, cur .. ' ' .. word)
end
"""

# KEYS[1] base. ARGV: owner, root, cand, tag, channel, external id, at, now, body,
# display name, identity entry, routable (1/0), thread key (opt), thread refs...
INGEST = r"""
local B = KEYS[1]
local owner, root, cand, tag = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local channel, at, now = ARGV[5], ARGV[7], ARGV[8]
local cu = B .. ':cu:' .. root
local rec = redis.call('HMGET', cu, 'nm', 'mi', 'lock')
-- Merged away: the data moved on, follow it (before asking whether the owner is ours).
if rec[2] then return {'redirect', rec[2]} end
if owner ~= root and redis.call('SISMEMBER', B .. ':mb:' .. root, owner) == 0 then
  return {'stale'}
end
if not rec[1] then
  if owner ~= root then return {'stale'} end
  -- First contact: the caller claimed the identity for this new id a moment ago.
  redis.call('HSET', cu, 'nm', ARGV[10], 'tg', '[]', 'ca', now)
  redis.call('RPUSH', B .. ':ci:' .. root, ARGV[11])
end
if rec[3] then return {'locked', rec[3]} end
local xfield = channel .. US .. ARGV[6]
local dup = redis.call('HGET', B .. ':x:' .. root, xfield)
if dup then return {'dup', recorded_pack(B, dup)} end
cand = mint_from(B, cand, false)

local p2 = inc(cand)
local p3 = inc(p2)
local side_id, main_id, new_conv = cand .. tag, p2 .. tag, p3 .. tag

local active = redis.call('HGET', cu, 'act')
-- The conversation the thread refs point at: an active one first, else the most
-- recently active, else the highest id.
local threaded, t_active, t_la = nil, false, -1
for i = 14, #ARGV do
  local convs = redis.call('HGET', B .. ':th:' .. root, ARGV[i])
  if convs then
    for conv in string.gmatch(convs, '%S+') do
      local c = redis.call('HMGET', B .. ':cv:' .. conv, 'st', 'la', 'cu')
      if c[1] and c[3] == root then
        local is_active = c[1] ~= 'resolved'
        local la = tonumber(c[2])
        local better = false
        if not threaded then better = true
        elseif is_active ~= t_active then better = is_active
        elseif la ~= t_la then better = la > t_la
        else better = conv > threaded end
        if better then threaded, t_active, t_la = conv, is_active, la end
      end
    end
  end
end
local conv = active
if threaded and ((not active) or threaded == active) then conv = threaded end

local side = false
if ARGV[12] == '0' then
  -- Machine mail (auto-reply, bounce) is filed where it belongs but changes nothing:
  -- no reopen, no new work, no "last channel"; with nowhere to go it starts resolved.
  conv = threaded or active
  if not conv then
    conv = new_conv
    redis.call('HSET', B .. ':cv:' .. conv, 'cu', root, 'og', root, 'st', 'resolved',
               'ch', channel, 'ca', at, 'la', at, 'ra', at, 'pr', '0', 'tg', '[]')
    redis.call('SADD', B .. ':cc:' .. root, conv)
  end
elseif not conv then
  conv = new_conv
  -- og: the customer it was born for, which unmerge goes by (it never changes).
  redis.call('HSET', B .. ':cv:' .. conv, 'cu', root, 'og', root, 'st', 'open', 'ch', channel,
             'ca', at, 'la', at, 'pr', '0', 'tg', '[]')
  redis.call('SADD', B .. ':cc:' .. root, conv)
else
  local cvk = B .. ':cv:' .. conv
  local c = redis.call('HMGET', cvk, 'st', 'la')
  if c[1] ~= 'open' then
    put_event(B, side_id, root, conv,
              internal_body('status', 'system', now, {from = c[1], to = 'open'}))
    side = event_pack(B, side_id)
  end
  local la = c[2]
  if tonumber(at) > tonumber(la) then la = at end
  redis.call('HSET', cvk, 'st', 'open', 'ch', channel, 'la', la)
  redis.call('HDEL', cvk, 'ra', 'su')
end
if ARGV[12] ~= '0' then redis.call('HSET', cu, 'act', conv) end
put_event(B, main_id, root, conv, ARGV[9])
redis.call('HSET', B .. ':x:' .. root, xfield, main_id)
local tk = opt(ARGV[13])
if tk then add_word(B .. ':th:' .. root, tk, conv) end
bump_seq(B, p3)
-- One JSON string rather than nested arrays: on the hot path, parsing a deep reply in
-- redis-py costs the client more than encoding it costs Redis.
return {'ok', cjson.encode({ev = event_pack(B, main_id), side = side, conv = conv,
                            cv = redis.call('HGETALL', B .. ':cv:' .. conv),
                            cu = customer_pack(B, root)})}
"""

# KEYS[1] base. ARGV: conversation, cand, tag, now, body, activity (1/0),
# first response (1/0), channel, external id (opt), thread key (opt), strict (1/0)
APPEND = r"""
local B = KEYS[1]
local conv, cand, tag, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local root, err = conv_owner(B, conv)
if err then return err end
local ext = opt(ARGV[9])
if ext then
  local dup = redis.call('HGET', B .. ':x:' .. root, ARGV[8] .. US .. ext)
  if dup then return {'dup', recorded_pack(B, dup)} end
end
local seq
cand, seq = mint_from(B, cand, ARGV[11] == '1')
if seq then return {'retry', seq} end
local eid = cand .. tag
put_event(B, eid, root, conv, ARGV[5])
local cvk = B .. ':cv:' .. conv
local c = redis.call('HMGET', cvk, 'la', 'fr')
if ARGV[6] == '1' and tonumber(now) > tonumber(c[1]) then redis.call('HSET', cvk, 'la', now) end
if ARGV[7] == '1' and not c[2] then redis.call('HSET', cvk, 'fr', now) end
if ext then redis.call('HSET', B .. ':x:' .. root, ARGV[8] .. US .. ext, eid) end
local tk = opt(ARGV[10])
if tk then add_word(B .. ':th:' .. root, tk, conv) end
bump_seq(B, cand)
return {'ok', event_pack(B, eid), redis.call('HGETALL', cvk), customer_pack(B, root)}
"""

# KEYS[1] base. ARGV: conversation, status, actor, until us (opt), until iso (opt),
# cand, tag, now
SET_STATUS = r"""
local B = KEYS[1]
local conv, status, actor = ARGV[1], ARGV[2], ARGV[3]
local cand, tag, now = ARGV[6], ARGV[7], ARGV[8]
local root, err = conv_owner(B, conv)
if err then return err end
local cvk = B .. ':cv:' .. conv
local c = redis.call('HMGET', cvk, 'st', 'su', 'ra')
local until_us = opt(ARGV[4])
if c[1] == status and (c[2] or nil) == until_us then
  return {'same', event_pack(B, newest_event(B, conv)), redis.call('HGETALL', cvk),
          customer_pack(B, root)}
end
local cu = B .. ':cu:' .. root
if c[1] == 'resolved' and status ~= 'resolved' then
  local act = redis.call('HGET', cu, 'act')
  if act and act ~= conv then return {'conflict', act} end
end
cand = mint_from(B, cand, false)
local eid = cand .. tag
local data = {from = c[1], to = status}
if opt(ARGV[5]) then data['until'] = opt(ARGV[5]) end
put_event(B, eid, root, conv, internal_body('status', actor, now, data))
redis.call('HSET', cvk, 'st', status)
if status == 'resolved' then
  if not c[3] then redis.call('HSET', cvk, 'ra', now) end
  if redis.call('HGET', cu, 'act') == conv then redis.call('HDEL', cu, 'act') end
else
  redis.call('HDEL', cvk, 'ra')
  redis.call('HSET', cu, 'act', conv)
end
if until_us then redis.call('HSET', cvk, 'su', until_us) else redis.call('HDEL', cvk, 'su') end
bump_seq(B, cand)
return {'ok', event_pack(B, eid), redis.call('HGETALL', cvk), customer_pack(B, root)}
"""

# KEYS[1] base. ARGV: conversation, agent (opt), actor, queue (opt), cand, tag, now
ASSIGN = r"""
local B = KEYS[1]
local conv, agent, actor, queue = ARGV[1], opt(ARGV[2]), ARGV[3], opt(ARGV[4])
local cand, tag, now = ARGV[5], ARGV[6], ARGV[7]
local root, err = conv_owner(B, conv)
if err then return err end
local cvk = B .. ':cv:' .. conv
local c = redis.call('HMGET', cvk, 'as', 'q')
local old_agent, old_queue = c[1] or nil, c[2] or nil
local new_queue = queue or old_queue
if old_agent == agent and old_queue == new_queue then
  return {'same', event_pack(B, newest_event(B, conv)), redis.call('HGETALL', cvk),
          customer_pack(B, root)}
end
cand = mint_from(B, cand, false)
local eid = cand .. tag
local data = {from = old_agent or cjson.null, to = agent or cjson.null,
              queue = queue or cjson.null}
put_event(B, eid, root, conv, internal_body('assignment', actor, now, data))
if agent then redis.call('HSET', cvk, 'as', agent) else redis.call('HDEL', cvk, 'as') end
if new_queue then redis.call('HSET', cvk, 'q', new_queue) else redis.call('HDEL', cvk, 'q') end
bump_seq(B, cand)
return {'ok', event_pack(B, eid), redis.call('HGETALL', cvk), customer_pack(B, root)}
"""

# KEYS[1] base. ARGV: conversation, tags json
SET_CONVERSATION_TAGS = r"""
local B = KEYS[1]
local root, err = conv_owner(B, ARGV[1])
if err then return err end
local cvk = B .. ':cv:' .. ARGV[1]
redis.call('HSET', cvk, 'tg', ARGV[2])
return {'ok', redis.call('HGETALL', cvk)}
"""

# KEYS[1] base. ARGV: customer, tags json
SET_CUSTOMER_TAGS = r"""
local B = KEYS[1]
local cu = B .. ':cu:' .. ARGV[1]
local rec = redis.call('HMGET', cu, 'nm', 'lock')
if not rec[1] then return {'missing'} end
if rec[2] then return {'locked', rec[2]} end
redis.call('HSET', cu, 'tg', ARGV[2])
return {'ok', customer_pack(B, ARGV[1])}
"""

# KEYS[1] base. ARGV: customer, name, tags json, now, identity entries...
CREATE_CUSTOMER = r"""
local B = KEYS[1]
local cid = ARGV[1]
local cu = B .. ':cu:' .. cid
if redis.call('EXISTS', cu) == 0 then
  redis.call('HSET', cu, 'nm', ARGV[2], 'tg', ARGV[3], 'ca', ARGV[4])
  for i = 5, #ARGV do redis.call('RPUSH', B .. ':ci:' .. cid, ARGV[i]) end
end
return customer_pack(B, cid)
"""

# KEYS[1] base. ARGV: customer, identity entry
ADD_IDENTITY = r"""
local B = KEYS[1]
local cid = ARGV[1]
local rec = redis.call('HMGET', B .. ':cu:' .. cid, 'nm', 'mi', 'lock')
if not rec[1] then return {'missing'} end
if rec[2] then return {'merged', rec[2]} end
if rec[3] then return {'locked', rec[3]} end
local key = B .. ':ci:' .. cid
if not redis.call('LPOS', key, ARGV[2]) then redis.call('RPUSH', key, ARGV[2]) end
return {'ok', customer_pack(B, cid)}
"""

# KEYS[1] the list of customers holding one unverified claim. ARGV: customer.
# Returns the first holder: the customer that claim resolves to.
CLAIM_LIST = r"""
if not redis.call('LPOS', KEYS[1], ARGV[1]) then redis.call('RPUSH', KEYS[1], ARGV[1]) end
return redis.call('LINDEX', KEYS[1], 0)
"""

# KEYS[1] one identity key. ARGV: expected value, new value ("" deletes).
COMPARE_AND_SET = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS[1] base. ARGV: customer
READ_CUSTOMER = r"""
return customer_pack(KEYS[1], ARGV[1])
"""

# KEYS[1] base. ARGV: customer. The active conversation id and hash, or nil.
ACTIVE = r"""
local act = redis.call('HGET', KEYS[1] .. ':cu:' .. ARGV[1], 'act')
if not act then return false end
return {act, redis.call('HGETALL', KEYS[1] .. ':cv:' .. act)}
"""

# KEYS[1] base. ARGV: customer, source. What a merge needs to know of its target.
MERGE_INFO = r"""
local B, cid = KEYS[1], ARGV[1]
local act = redis.call('HGET', B .. ':cu:' .. cid, 'act')
local st = false
if act then st = redis.call('HGET', B .. ':cv:' .. act, 'st') end
local record = redis.call('HGET', B .. ':mg:' .. cid, ARGV[2])
return {customer_pack(B, cid), act or '', st or '', record or ''}
"""

# KEYS[1] base. ARGV: conversation
READ_CONVERSATION = r"""
return redis.call('HGETALL', KEYS[1] .. ':cv:' .. ARGV[1])
"""

# KEYS[1] base. ARGV: with context (1/0), event ids... For each event: its pack and,
# with context, its conversation hash and its customer's pack (what Recorded needs).
READ_EVENTS = r"""
local B = KEYS[1]
local out = {}
for i = 2, #ARGV do
  if ARGV[1] == '1' then out[#out + 1] = recorded_pack(B, ARGV[i])
  else out[#out + 1] = {event_pack(B, ARGV[i])} end
end
return out
"""

# KEYS[1] base. ARGV: 'tl' (customer timeline) or 'ce' (conversation), owner id,
# 'desc' (newest first, before cursor) or 'asc' (after cursor), cursor (opt), limit
EVENT_PAGE = r"""
local B = KEYS[1]
local kind, id, dir, cursor, limit = ARGV[1], ARGV[2], ARGV[3], opt(ARGV[4]), tonumber(ARGV[5])
if kind == 'ce' then
  local mv = redis.call('HGET', B .. ':cv:' .. id, 'mv')
  if mv then return {'moved', mv} end
end
local key = B .. ':' .. kind .. ':' .. id
local ids
if dir == 'desc' then
  local max = '+'
  if cursor then max = '(' .. cursor end
  ids = redis.call('ZREVRANGEBYLEX', key, max, '-', 'LIMIT', 0, limit)
else
  local min = '-'
  if cursor then min = '(' .. cursor end
  ids = redis.call('ZRANGEBYLEX', key, min, '+', 'LIMIT', 0, limit)
end
local events = {}
for i = 1, #ids do events[i] = event_pack(B, ids[i]) end
return {'ok', redis.call('ZCARD', key), events}
"""

# KEYS[1] base. ARGV: customers... Every conversation hash of each customer.
CUSTOMER_CONVERSATIONS = r"""
local B = KEYS[1]
local out = {}
for i = 1, #ARGV do
  local convs = {}
  for _, conv in ipairs(redis.call('SMEMBERS', B .. ':cc:' .. ARGV[i])) do
    local h = redis.call('HGETALL', B .. ':cv:' .. conv)
    if #h > 0 then
      h[#h + 1] = 'id'
      h[#h + 1] = conv
      convs[#convs + 1] = h
    end
  end
  out[i] = convs
end
return out
"""

# KEYS[1] base. ARGV: customer. Everything a merge or unmerge may have to move.
EXPORT = r"""
local B = KEYS[1]
local cid = ARGV[1]
local convs = {}
for _, conv in ipairs(redis.call('SMEMBERS', B .. ':cc:' .. cid)) do
  convs[#convs + 1] = {conv, redis.call('HGETALL', B .. ':cv:' .. conv),
                       redis.call('ZRANGE', B .. ':ce:' .. conv, 0, -1)}
end
local events = {}
for _, eid in ipairs(redis.call('ZRANGE', B .. ':tl:' .. cid, 0, -1)) do
  events[#events + 1] = event_pack(B, eid)
end
return {customer_pack(B, cid), convs, events, redis.call('HGETALL', B .. ':x:' .. cid),
        redis.call('HGETALL', B .. ':th:' .. cid), redis.call('SMEMBERS', B .. ':mb:' .. cid),
        redis.call('HGETALL', B .. ':mg:' .. cid), redis.call('GET', B .. ':seq') or ''}
"""

# KEYS[1] base. ARGV: customer, token, now ms, stale after ms.
# A lock older than `stale` belongs to a process that died mid-merge: take it over (the
# caller then finishes that operation, whose steps are safe to repeat).
LOCK = r"""
local cu = KEYS[1] .. ':cu:' .. ARGV[1]
local rec = redis.call('HMGET', cu, 'nm', 'lock', 'mi', 'mev')
if not rec[1] then return {'missing'} end
if rec[2] and rec[2] ~= ARGV[2] then
  local at = tonumber(string.match(rec[2], '|(%d+)$') or '0')
  if tonumber(ARGV[3]) - at < tonumber(ARGV[4]) then return {'busy', rec[2]} end
end
redis.call('HSET', cu, 'lock', ARGV[2])
return {'ok', rec[3] or '', rec[4] or '', rec[2] or ''}
"""

# KEYS[1] base. ARGV: customer, token.
UNLOCK = r"""
local cu = KEYS[1] .. ':cu:' .. ARGV[1]
if redis.call('HGET', cu, 'lock') == ARGV[2] then redis.call('HDEL', cu, 'lock') end
return 1
"""

# KEYS[1] base. ARGV: customer holding the lock, token, minimum id prefix ("" none),
# then operations: name, argument count, key suffix, arguments...
# Applies a merge's prepared writes to one tag, only while the caller still holds the
# lock, so that a stale merger whose lock was taken over cannot write any more.
APPLY = r"""
local B = KEYS[1]
if redis.call('HGET', B .. ':cu:' .. ARGV[1], 'lock') ~= ARGV[2] then return {'lost'} end
if ARGV[3] ~= '' then
  local seq = seq_conflict(B, ARGV[3])
  if seq then return {'retry', seq} end
end
local i = 4
while i <= #ARGV do
  local op, n, key = ARGV[i], tonumber(ARGV[i + 1]), B .. ARGV[i + 2]
  local a = {}
  for k = 1, n do a[k] = ARGV[i + 2 + k] end
  if op == 'HSET' or op == 'HDEL' or op == 'SADD' or op == 'SREM' or op == 'ZREM'
     or op == 'RPUSH' then
    for s = 1, n, 5000 do
      redis.call(op, key, unpack(a, s, math.min(n, s + 4999)))
    end
  elseif op == 'DEL' then redis.call('DEL', key)
  elseif op == 'SET' then redis.call('SET', key, a[1])
  elseif op == 'ZADD0' then
    for k = 1, n do redis.call('ZADD', key, 0, a[k]) end
  elseif op == 'LREM' then
    for k = 1, n do redis.call('LREM', key, 0, a[k]) end
  elseif op == 'ADDWORD' then add_word(key, a[1], a[2])
  elseif op == 'SEQ' then bump_seq(B, a[1])
  elseif op == 'UNLOCK' then redis.call('HDEL', B .. ':cu:' .. ARGV[1], 'lock')
  else error('unknown op ' .. op) end
  i = i + 3 + n
end
return {'ok'}
"""

# KEYS[1] the outbox base. ARGV: now us, limit, lease until us.
# Due entries get a lease (their score moves to the lease's end) and one more attempt.
OUTBOX_CLAIM = r"""
local due = KEYS[1] .. ':due'
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, eid in ipairs(ids) do
  redis.call('ZADD', due, ARGV[3], eid)
  local n = redis.call('HINCRBY', KEYS[1] .. ':att', eid, 1)
  out[#out + 1] = {eid, n - 1}
end
return out
"""

# KEYS[1] base. ARGV: event id, state, error (opt), provider id (opt), final states csv
DELIVERY = r"""
local B = KEYS[1]
local eid, state, err, pid = ARGV[1], ARGV[2], opt(ARGV[3]), opt(ARGV[4])
local stored = redis.call('HGET', B .. ':ev', eid)
if not stored then return {'missing'} end
if stored:sub(1, 1) == '@' then return {'moved', stored:sub(2)} end
local body = cjson.decode(string.match(stored, '^[^\31]*\31[^\31]*\31(.*)$'))
local cur = {s = body['delivery_state'], e = body['delivery_error'], x = body['external_id']}
local dl = redis.call('HGET', B .. ':dl', eid)
if dl then cur = cjson.decode(dl) end
if cur.s == nil or cur.s == cjson.null then return {'nodelivery'} end
local final = {}
for s in string.gmatch(ARGV[5], '[^,]+') do final[s] = true end
local new = {s = cur.s, e = cur.e, x = pid or cur.x}
if not (final[cur.s] and not final[state]) then
  new.s = state
  new.e = err
end
redis.call('HSET', B .. ':dl', eid, cjson.encode(new))
return {'ok', event_pack(B, eid)}
"""

SCRIPTS: dict[str, str] = {
    "ingest": INGEST,
    "append": APPEND,
    "set_status": SET_STATUS,
    "assign": ASSIGN,
    "set_conversation_tags": SET_CONVERSATION_TAGS,
    "set_customer_tags": SET_CUSTOMER_TAGS,
    "create_customer": CREATE_CUSTOMER,
    "add_identity": ADD_IDENTITY,
    "claim_list": CLAIM_LIST,
    "compare_and_set": COMPARE_AND_SET,
    "read_customer": READ_CUSTOMER,
    "read_conversation": READ_CONVERSATION,
    "active": ACTIVE,
    "merge_info": MERGE_INFO,
    "read_events": READ_EVENTS,
    "event_page": EVENT_PAGE,
    "customer_conversations": CUSTOMER_CONVERSATIONS,
    "export": EXPORT,
    "lock": LOCK,
    "unlock": UNLOCK,
    "apply": APPLY,
    "outbox_claim": OUTBOX_CLAIM,
    "delivery": DELIVERY,
}


def source(name: str) -> str:
    """The full text of a script: the shared helpers, then its body."""
    return PRELUDE + SCRIPTS[name]
