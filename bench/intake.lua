-- wrk script for bench/intake.py. Arguments (after wrk's "--"):
--   post <threads> <token> <path> <total> <first> <body file> [<rate> <connections>]
--       POST <total> requests to <path>, shared among wrk's threads, each a new person
--       (the body file's __NINO__ replaced by a NINO of its own, numbered from <first>)
--       with its own Idempotency-Key. A body file named *.jsonl instead holds one body a
--       line, a person each: POST n (numbered from <first>) sends line n - <first> + 1.
--       A thread stops once all of its POSTs are answered; while its last ones are in
--       flight its idle connections wait (delay()), so no thread sends more POSTs than
--       its share and wrk's latency figures are the POSTs'
--       (but for a few GET /healthz when there are fewer POSTs than connections).
--       Once every thread is done wrk is interrupted; POSTs are timed from the first
--       sent to the last answered ("posting_us").
--       With a <rate> (POSTs a second in all, over <connections>), each thread sends its
--       POSTs on a fixed schedule instead of back to back, to see answer times at a
--       steady load: a connection's first request, which wrk sends at once, is then a
--       GET /healthz (one per connection in wrk's latency figures), and each later one
--       waits for the thread's next slot. A POST that could not be sent when its slot
--       came (every connection of the thread still waiting for an answer) is counted
--       late, with the longest lateness: wrk times a request from when it is sent, so
--       its latency figures hide that wait.
--   floor
--       GET /healthz until wrk's duration is up.
-- At the end it prints one line, "WRK_RESULT {json}", with what was answered how.

local threads = {}

-- Wall-clock microseconds (wrk's Lua is LuaJIT, whose os.time has whole seconds only).
-- wrk's own duration is always its -d, however early the threads stop, so the script
-- times its POSTs itself: from a thread's first POST to the answer of its last.
local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_usec; } bench_timeval;
int gettimeofday(bench_timeval *tv, void *tz);
]])
local function now_us()
   local tv = ffi.new("bench_timeval")
   ffi.C.gettimeofday(tv, nil)
   return tonumber(tv.tv_sec) * 1000000 + tonumber(tv.tv_usec)
end

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   mode = args[1]
   answered, created, ok, refused, first_refusal = 0, 0, 0, 0, ""
   if mode == "post" then
      -- wrk's -t, given again: init runs before the later threads are set up.
      local thread_count = tonumber(args[2])
      token, path = args[3], args[4]
      local total, start = tonumber(args[5]), tonumber(args[6])
      -- This thread's share of the numbers: [first, first + budget).
      local share = math.floor(total / thread_count)
      budget = share + ((id < total % thread_count) and 1 or 0)
      first = start + id * share + math.min(id, total % thread_count)
      local file = assert(io.open(args[7]))
      if args[7]:sub(-6) == ".jsonl" then
         bodies = {} -- this thread's lines only: bodies[k] is POST first + k - 1
         local line_number = 0
         for line in file:lines() do
            line_number = line_number + 1
            if line_number > first - start and line_number <= first - start + budget then
               table.insert(bodies, line)
            end
         end
         assert(#bodies == budget, "the body file has fewer lines than POSTs")
      else
         template = file:read("*a")
      end
      file:close()
      posted = 0
      local rate = tonumber(args[8] or "0")
      -- Microseconds between this thread's POSTs; 0: back to back.
      interval_us = rate > 0 and (1000000 * thread_count / rate) or 0
      openers = rate > 0 and math.floor(tonumber(args[9]) / thread_count) or 0
      scheduled = 0
      -- Defined only here: wrk looks for a delay() after init, and in floor mode the
      -- requests go back to back.
      delay = post_delay
   end
   started_us, finished_us = 0, 0
   late, late_max_us = 0, 0
   -- wrk calls the first thread's request() once before any connection opens, only to
   -- check what it returns (wrk.c, script_verify_request): that call must not use up
   -- one of the thread's POSTs, or the thread would wait for an answer never asked for.
   verifying = (id == 0)
end

local function nino(n)
   local letters = { "A", "B", "C", "D" }
   return string.format("CE%06d%s", n % 1000000, letters[math.floor(n / 1000000) % 4 + 1])
end

function request()
   if verifying then
      verifying = false
      return wrk.format("GET", "/healthz")
   end
   if mode == "post" and openers > 0 then
      openers = openers - 1 -- a connection's first request, sent at once: not a POST
      return wrk.format("GET", "/healthz")
   end
   if mode == "post" and posted < budget then
      local n = first + posted
      if posted == 0 then
         started_us = now_us()
      end
      posted = posted + 1
      local headers = {
         ["Authorization"] = "Bearer " .. token,
         ["Content-Type"] = "application/json",
         ["Idempotency-Key"] = "bench-" .. n,
      }
      local body = bodies and bodies[posted] or (template:gsub("__NINO__", nino(n)))
      return wrk.format("POST", path, headers, body)
   end
   return wrk.format("GET", "/healthz")
end

local function finish()
   if finished_us == 0 then
      finished_us = now_us()
      -- wrk waits out its whole -d whatever its threads do; this line tells
      -- bench/intake.py, which interrupts wrk (SIGINT) once every thread has said so.
      io.write("WRK_THREAD_DONE\n")
      io.flush()
   end
   wrk.thread:stop()
end

-- Milliseconds a connection waits before its next request: none while this thread has
-- POSTs to send, then longer than any run, so the idle ones send nothing more.
function post_delay()
   if openers > 0 then
      return 0 -- the request this delays is a connection's first: a GET /healthz, not a slot
   end
   if interval_us > 0 and scheduled < budget then
      if scheduled == 0 then
         schedule_us = now_us()
      end
      local due = schedule_us + scheduled * interval_us
      scheduled = scheduled + 1
      local wait_us = due - now_us()
      if wait_us < -1000 then -- its slot passed while every connection waited for an answer
         late = late + 1
         late_max_us = math.max(late_max_us, -wait_us)
      end
      return math.max(0, math.floor(wait_us / 1000))
   end
   if interval_us == 0 and posted < budget then
      return 0
   end
   if budget == 0 then
      finish() -- a share of nothing (fewer POSTs than threads)
   end
   return 3600 * 1000
end

function response(status, headers, body)
   if mode == "post" then
      -- 201: a new event stored. 200: a GET /healthz, sent only as a connection's very
      -- first request when the thread had no POST left for it (wrk's delay() comes
      -- after a connection's first request, so a run with fewer POSTs per thread than
      -- connections has a few); never a POST, since each is a new person with a new
      -- Idempotency-Key. Anything else: refused.
      if status == 201 then
         created = created + 1
      elseif status == 200 then
         ok = ok + 1
      else
         refused = refused + 1
         if first_refusal == "" then
            first_refusal = status .. " " .. string.sub(body or "", 1, 200)
         end
      end
      if created + refused >= budget then
         finish()
      end
   else
      if status == 200 then ok = ok + 1 else refused = refused + 1 end
   end
end

local function escape(text)
   return (text:gsub('[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end))
end

function done(summary, latency, requests)
   local created_all, ok_all, refused_all, refusal = 0, 0, 0, ""
   local started, finished = nil, 0
   local late_all, late_max = 0, 0
   for _, thread in ipairs(threads) do
      late_all = late_all + thread:get("late")
      late_max = math.max(late_max, thread:get("late_max_us"))
      created_all = created_all + thread:get("created")
      ok_all = ok_all + thread:get("ok")
      refused_all = refused_all + thread:get("refused")
      if refusal == "" then refusal = thread:get("first_refusal") end
      local s, f = thread:get("started_us"), thread:get("finished_us")
      if s > 0 and (started == nil or s < started) then started = s end
      if f > finished then finished = f end
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"created": %d, "ok": %d, "refused": %d, "first_refusal": "%s", "requests": %d,'
         .. ' "duration_us": %d, "posting_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d,'
         .. ' "timeout": %d}, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "late": %d, "late_max_us": %d}\n',
      created_all, ok_all, refused_all, escape(refusal), summary.requests, summary.duration,
      (started and finished > started) and (finished - started) or 0,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      late_all, late_max
   ))
end
