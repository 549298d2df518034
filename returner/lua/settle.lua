-- Settle deliveries whose outcome is durable, at once: for each entry still pending in
-- the group, ack it, add its dead letter if it failed, emit its event (and PUBLISH it
-- when asked), push its message onto the result list when asked, and delete it from
-- the stream so the stream never grows without bound. An entry someone else settled
-- first (XACK 0) gets neither a dead letter, nor an event, nor a message: every settled
-- entry has exactly one of each, and an unsettled one has none.
-- KEYS[1] stream  KEYS[2] dead letters {L}:dead  KEYS[3] events {L}:events
-- KEYS[4] SUCCESS_QUEUE  KEYS[5] ERROR_QUEUE (either KEYS[3] when not pushed to here)
-- ARGV[1] group  ARGV[2] consumer  ARGV[3] events MAXLEN (approximate)  ARGV[4] '1':
-- also PUBLISH each event on events:{request_id}  ARGV[5] dead letters MAXLEN
-- (approximate)  ARGV[6] '1': push onto SUCCESS_QUEUE  ARGV[7] '1': push onto
-- ERROR_QUEUE  ARGV[8] number of entries N
-- ARGV[9..] 9 values per entry: entry ID, request_id, image_id, outcome (completed,
-- duplicate, failed, dead_lettered), status (the record's: completed, or failed, which
-- dead-letters it), file_path, image_url, error, timestamp (the record's)
-- then 2 values per failed entry, in the same order: its delivery count and its task
-- (the original bytes, or their first KiB)
-- Returns: the number of entries this call settled (= events emitted)
local function id_or_null(value)
  if value == '' then
    return cjson.null
  end
  return value
end

local settled, dead, ids = 0, 9 + 9 * tonumber(ARGV[8]), {}
for i = 9, dead - 1, 9 do
  local id, rid, iid, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local status, path, url, err, ts = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7],
                                     ARGV[i + 8]
  local failed = status == 'failed'
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    settled = settled + 1
    if failed then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'task', ARGV[dead + 1],
                 'error', err, 'deliveries', ARGV[dead], 'entry_id', id,
                 'consumer', ARGV[2], 'request_id', rid, 'image_id', iid)
    end
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'request_id', rid,
               'image_id', iid, 'status', status, 'outcome', outcome, 'file_path', path,
               'image_url', url, 'error', err, 'entry_id', id, 'timestamp', ts)
    if not failed and ARGV[6] == '1' then
      redis.call('RPUSH', KEYS[4], cjson.encode({request_id = id_or_null(rid),
                 image_id = id_or_null(iid), image_url = url}))
    elseif failed and ARGV[7] == '1' then
      redis.call('RPUSH', KEYS[5], cjson.encode({request_id = id_or_null(rid),
                 image_id = id_or_null(iid), error_message = err, timestamp = ts}))
    end
    if ARGV[4] == '1' and rid ~= '' then
      local data = {request_id = rid, image_id = iid, status = status, outcome = outcome,
                    file_path = path, image_url = url, error = err, entry_id = id,
                    timestamp = ts}
      local name = failed and 'hosting_failed' or 'hosting_completed'
      redis.call('PUBLISH', 'events:' .. rid,
                 cjson.encode({request_id = rid, event = name, data = data}))
    end
  end
  if failed then
    dead = dead + 2
  end
  ids[#ids + 1] = id
end
if #ids > 0 then
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return settled
