// Ferry issue #8: mineflayer bots that play on a server while it moves between hosts.
//
//   node bots.js --host IP [--port 25565] [--bots 3] [--prefix ferry] [--chat-ms 2000]
//
// Commands, one per stdin line:   place [N] | check | stats | quit
// Output: one JSON object per stdout line ({"event": ...}); the final one is
// {"event": "report", ...}. Logs go to stderr. EOF on stdin, SIGINT and SIGTERM also quit.
//
// Per bot it records what a player would notice during a move:
// - stayed connected: one login and no 'end'/'kicked' event. A bot never reconnects, so a
//   lost connection stays lost and shows. ('error' events are listed apart.)
// - tick gaps: the longest gap between consecutive `update_time` packets. flying-squid sends
//   one to every player every 20th tick of its 50 ms game loop (1 Hz, daycycle plugin),
//   whatever the players do; ticks missed while the process is frozen are not made up, so
//   gap - 1000 ms is how long the game stood still for that player, network hold included.
//   `packet_gap_ms` (any packet; the other bots' movement keeps that stream dense when
//   several play) is a finer but load-dependent view of the same pause.
// - chats sent, and chats received from each other bot (by sequence number, so losses and
//   duplicates show as out of order).
// - placed blocks at known coordinates (towers next to each bot's home), checked from the
//   bot's own view and from a fresh observer bot whose chunks come from the server after the
//   move (the bots' cached chunks would still show a block the server lost).
'use strict'

const readline = require('readline')
const { parseArgs } = require('util')
const { performance } = require('perf_hooks')
const mineflayer = require('mineflayer')
const { Vec3 } = require('vec3')

const { values: opts } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '25565' },
    bots: { type: 'string', default: '3' },
    prefix: { type: 'string', default: 'ferry' },
    version: { type: 'string', default: '1.16.5' },
    'chat-ms': { type: 'string', default: '2000' },
    'join-timeout-ms': { type: 'string', default: '60000' }
  }
})
const PORT = Number(opts.port)
const COUNT = Number(opts.bots)
const CHAT_MS = Number(opts['chat-ms'])
const JOIN_TIMEOUT_MS = Number(opts['join-timeout-ms'])
const GROUND_Y = 4 // flying-squid's superflat: bedrock 0, dirt 1-3, grass 4
const BLOCKS = ['stone', 'oak_planks', 'bricks', 'gold_block', 'diamond_block', 'emerald_block', 'lapis_block', 'iron_block']
const TOWER_HEIGHT = 4 // blocks per tower before starting the next one: stays within reach
const CHAT_RE = /^<(\S+)> ferry-chat (\S+) (\d+)$/

function emit (obj) {
  process.stdout.write(JSON.stringify({ t: Date.now(), ...obj }) + '\n')
}
function log (...args) {
  process.stderr.write(args.join(' ') + '\n')
}
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

// Poll: mineflayer's waitForChunksToLoad() waits for the whole view and sometimes never
// returns after a teleport; we only need the few blocks we touch.
async function waitUntil (cond, ms, what) {
  const deadline = Date.now() + ms
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`)
    await sleep(100)
  }
}

function withTimeout (promise, ms, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms) })
  ]).finally(() => clearTimeout(timer))
}

// Longest gap between consecutive events: overall, and since the last `stats` command.
class GapMeter {
  constructor () { this.last = null; this.max = 0; this.maxAt = null; this.window = 0; this.count = 0; this.armed = false }
  // Gaps count from when the bot has joined and set up: the join itself is not a pause.
  arm () { this.armed = true; this.last = null }
  beat () {
    const now = performance.now()
    if (this.armed && this.last !== null) {
      const gap = now - this.last
      if (gap > this.max) { this.max = gap; this.maxAt = Date.now() }
      if (gap > this.window) this.window = gap
    }
    this.last = now
    this.count++
  }

  take () { const w = this.window; this.window = 0; return Math.round(w) }
}

class Player {
  constructor (index) {
    this.index = index
    this.name = `${opts.prefix}${index}`
    this.blockName = BLOCKS[index % BLOCKS.length]
    // Homes 4 blocks apart on a line; a bot patrols south of its home, its towers stand
    // north of it, so no bot walks into a tower.
    this.home = new Vec3(2 + 4 * index, GROUND_Y + 1, 8)
    this.spawned = false
    this.logins = 0
    this.disconnects = []
    this.errors = []
    this.timeGap = new GapMeter()
    this.packetGap = new GapMeter()
    this.chatSent = 0
    this.chatSeq = 0
    this.chatReceived = {} // sender -> count
    this.chatLastSeq = {} // sender -> last sequence number seen
    this.chatOutOfOrder = 0
    this.placed = [] // {x, y, z, name}
    this.placeFailures = []
    this.busy = false
    this.atHome = false
    this.timers = []
  }

  connected () { return this.spawned && this.disconnects.length === 0 }

  // Join, retrying while the server turns players away (flying-squid kicks joins until its
  // plugins are loaded: "Server is still starting!"). Only a connection that spawned counts.
  async start () {
    const deadline = Date.now() + JOIN_TIMEOUT_MS
    for (let attempt = 1; ; attempt++) {
      const bot = mineflayer.createBot({
        host: opts.host,
        port: PORT,
        username: this.name,
        version: opts.version,
        auth: 'offline',
        viewDistance: 'tiny', // 2 chunks: what the checks need, little work for the server
        checkTimeoutInterval: 60000 // the bot's own keepalive timeout; must outlast a move
      })
      bot.on('error', () => {}) // before spawning, 'end' follows and says enough
      try {
        await withTimeout(new Promise((resolve, reject) => {
          bot.once('spawn', resolve)
          bot.once('end', reason => reject(new Error(`ended before spawning: ${reason}`)))
        }), Math.max(1000, deadline - Date.now()), 'spawn')
        this.bot = bot
        break
      } catch (err) {
        bot.removeAllListeners()
        bot.on('error', () => {})
        bot.end()
        if (Date.now() >= deadline) throw new Error(`${this.name}: ${err.message} (attempt ${attempt})`)
        log(`${this.name}: attempt ${attempt}: ${err.message}; retrying`)
        await sleep(1000)
      }
    }
    this.watch(this.bot)
    await withTimeout(this.prepare(), 60000, `${this.name} prepare`)
  }

  // From the first spawn on, every login, disconnect and error counts.
  watch (bot) {
    this.logins = 1
    bot.on('login', () => { this.logins++ })
    bot._client.on('update_time', () => this.timeGap.beat())
    bot._client.on('packet', () => this.packetGap.beat())
    bot.on('kicked', (reason) => {
      this.disconnects.push({ kind: 'kicked', reason: String(reason), t: Date.now() })
      emit({ event: 'disconnect', bot: this.name, kind: 'kicked', reason: String(reason) })
    })
    bot.on('end', (reason) => {
      this.disconnects.push({ kind: 'end', reason: String(reason), t: Date.now() })
      this.stopPlaying()
      emit({ event: 'disconnect', bot: this.name, kind: 'end', reason: String(reason) })
    })
    bot.on('error', (err) => {
      this.errors.push(String(err && err.message))
      emit({ event: 'error', bot: this.name, error: String(err && err.message) })
    })
    bot.on('messagestr', (text) => this.onMessage(text))
  }

  async prepare () {
    const bot = this.bot
    // Move home first: a freshly spawned player stands at a random point in 0..30.
    // Asked again every few seconds: a server still busy after the join (a loaded CI machine)
    // may drop or not yet run the first command.
    const home = this.home.offset(0.5, 0, 0.5)
    const atHome = () => bot.entity.position.distanceTo(home) < 1
    for (let ask = 1; !atHome(); ask++) {
      bot.chat(`/tp ${this.home.x} ${this.home.y} ${this.home.z}`)
      try {
        await waitUntil(atHome, 3000, `${this.name} teleport`)
      } catch (err) {
        if (ask >= 8) throw err
        log(`${this.name}: not home after teleport request ${ask}; asking again`)
      }
    }
    const ground = [this.home, ...[-1, 0, 1].map(dx => this.home.offset(dx, 0, 2))]
    await waitUntil(() => ground.every(p => bot.blockAt(p.offset(0, -1, 0))), 15000, `${this.name} chunks`)
    const Item = require('prismarine-item')(bot.registry)
    const item = new Item(bot.registry.itemsByName[this.blockName].id, 64)
    await bot.creative.setInventorySlot(36, item)
    bot.setQuickBarSlot(0)
    this.spawned = true
    this.timeGap.arm()
    this.packetGap.arm()
    emit({ event: 'spawned', bot: this.name, home: this.home, position: bot.entity.position })
    this.timers.push(setInterval(() => this.chat(), CHAT_MS + this.index * 97)) // spread out
    this.patrol()
  }

  chat () {
    if (!this.connected()) return
    this.chatSeq++
    this.bot.chat(`ferry-chat ${this.name} ${this.chatSeq}`)
    this.chatSent++
  }

  onMessage (text) {
    const m = CHAT_RE.exec(text)
    if (!m || m[2] === this.name) return
    const sender = m[2]
    const seq = Number(m[3])
    this.chatReceived[sender] = (this.chatReceived[sender] || 0) + 1
    if (this.chatLastSeq[sender] !== undefined && seq !== this.chatLastSeq[sender] + 1) this.chatOutOfOrder++
    this.chatLastSeq[sender] = seq
  }

  // Walk back and forth between home and 3 blocks south of it; while busy (placing), go
  // home and stand there so every tower spot is within reach.
  async patrol () {
    const bot = this.bot
    const ends = [this.home.offset(0.5, 0, 0.5), this.home.offset(0.5, 0, -2.5)]
    let leg = 1
    while (this.connected()) {
      const target = this.busy ? ends[0] : ends[leg]
      const here = bot.entity.position
      const arrived = Math.hypot(target.x - here.x, target.z - here.z) < 0.4
      this.atHome = this.busy && arrived
      if (arrived) {
        bot.clearControlStates()
        if (!this.busy) leg = 1 - leg
        await sleep(this.busy ? 50 : 300)
        continue
      }
      await bot.lookAt(new Vec3(target.x, here.y + bot.entity.height * 0.9, target.z), true)
      bot.setControlState('forward', true)
      await sleep(50)
    }
  }

  nextSpot () {
    const k = this.placed.length
    const tower = Math.floor(k / TOWER_HEIGHT)
    // Towers at x = home.x - 1, home.x, home.x + 1 (then again further north).
    return this.home.offset((tower % 3) - 1, k % TOWER_HEIGHT, 2 + Math.floor(tower / 3))
  }

  async placeOne () {
    const bot = this.bot
    const spot = this.nextSpot()
    const below = bot.blockAt(spot.offset(0, -1, 0))
    if (!below || below.name === 'air') throw new Error(`nothing to place on below ${spot}`)
    if (bot.heldItem?.name !== this.blockName) {
      const Item = require('prismarine-item')(bot.registry)
      await bot.creative.setInventorySlot(36, new Item(bot.registry.itemsByName[this.blockName].id, 64))
      bot.setQuickBarSlot(0)
    }
    await bot.placeBlock(below, new Vec3(0, 1, 0))
    const got = bot.blockAt(spot)?.name
    if (got !== this.blockName) throw new Error(`placed at ${spot} but the bot sees ${got}`)
    const rec = { x: spot.x, y: spot.y, z: spot.z, name: this.blockName }
    this.placed.push(rec)
    return rec
  }

  async place (n) {
    if (!this.connected()) return { bot: this.name, placed: [], error: 'not connected' }
    this.busy = true
    const placed = []
    try {
      await waitUntil(() => this.atHome, 10000, `${this.name} walking home`)
      await sleep(100) // come to rest: placing looks at the spot from where the bot stands
      for (let i = 0; i < n; i++) placed.push(await this.placeOne())
      return { bot: this.name, placed }
    } catch (err) {
      this.placeFailures.push(String(err.message))
      return { bot: this.name, placed, error: String(err.message) }
    } finally {
      this.busy = false
    }
  }

  checkOwnView () {
    const missing = this.placed.filter(b => this.bot.blockAt(new Vec3(b.x, b.y, b.z))?.name !== b.name)
    return { placed: this.placed.length, missing }
  }

  stats () {
    return {
      bot: this.name,
      connected: this.connected(),
      time_gap_window_ms: this.timeGap.take(),
      packet_gap_window_ms: this.packetGap.take(),
      time_gap_max_ms: Math.round(this.timeGap.max),
      chat_sent: this.chatSent,
      chat_received: Object.values(this.chatReceived).reduce((a, b) => a + b, 0)
    }
  }

  report () {
    return {
      bot: this.name,
      spawned: this.spawned,
      stayed_connected: this.connected() && this.logins === 1,
      logins: this.logins,
      disconnects: this.disconnects,
      errors: this.errors,
      tick_packet: 'update_time',
      time_updates: this.timeGap.count,
      time_gap_max_ms: Math.round(this.timeGap.max),
      time_gap_max_at: this.timeGap.maxAt,
      packet_gap_max_ms: Math.round(this.packetGap.max),
      packet_gap_max_at: this.packetGap.maxAt,
      chat_sent: this.chatSent,
      chat_received: { ...this.chatReceived },
      chat_out_of_order: this.chatOutOfOrder,
      blocks_placed: this.placed.length,
      place_failures: this.placeFailures
    }
  }

  stopPlaying () {
    for (const t of this.timers) clearInterval(t)
    this.timers = []
  }

  quit () {
    this.stopPlaying()
    if (this.connected()) {
      this.bot.removeAllListeners('end') // our own quit is not a disconnect
      this.bot.quit('done')
    }
  }
}

// A fresh player that joins, reads every placed block from chunks the server sends now,
// and leaves: the server's world, not a bot's cache.
async function observe (players) {
  const name = `${opts.prefix}obs${++observe.count}`
  const bot = mineflayer.createBot({ host: opts.host, port: PORT, username: name, version: opts.version, auth: 'offline', viewDistance: 'tiny' })
  try {
    await withTimeout(new Promise((resolve, reject) => {
      bot.once('spawn', resolve)
      bot.once('end', reason => reject(new Error(`observer ended: ${reason}`)))
      bot.once('error', reject)
    }), JOIN_TIMEOUT_MS, 'observer spawn')
    const first = players[0].home
    bot.chat(`/tp ${first.x} ${first.y} ${first.z - 4}`)
    const spots = players.flatMap(p => p.placed).map(b => new Vec3(b.x, b.y, b.z))
    await waitUntil(() => spots.every(v => bot.blockAt(v)), 20000, 'observer chunks')
    const result = {}
    for (const p of players) {
      const missing = p.placed.filter(b => bot.blockAt(new Vec3(b.x, b.y, b.z))?.name !== b.name)
        .map(b => ({ ...b, seen: bot.blockAt(new Vec3(b.x, b.y, b.z))?.name ?? null }))
      result[p.name] = { placed: p.placed.length, missing }
    }
    return { observer: name, bots: result }
  } finally {
    bot.quit('checked')
  }
}
observe.count = 0

async function main () {
  const players = Array.from({ length: COUNT }, (_, i) => new Player(i))
  // One at a time: flying-squid handles joins best unhurried.
  for (const p of players) {
    try {
      await p.start()
    } catch (err) {
      p.errors.push(String(err.message))
      emit({ event: 'error', bot: p.name, error: String(err.message) })
    }
  }
  emit({ event: 'ready', bots: players.filter(p => p.spawned).map(p => p.name) })

  let quitting = false
  async function quit () {
    if (quitting) return
    quitting = true
    emit({ event: 'report', bots: players.map(p => p.report()) })
    for (const p of players) p.quit()
    await sleep(300)
    process.exit(0)
  }

  const commands = {
    place: async (n = '1') => ({ event: 'placed', bots: await Promise.all(players.map(p => p.place(Number(n)))) }),
    check: async () => {
      const own = Object.fromEntries(players.map(p => [p.name, p.connected() ? p.checkOwnView() : { error: 'not connected' }]))
      let server
      try {
        server = await observe(players)
      } catch (err) {
        server = { error: String(err.message) }
      }
      const ok = !server.error && players.every(p => server.bots[p.name].missing.length === 0 && own[p.name].missing?.length === 0)
      return { event: 'check', ok, own_view: own, server_view: server }
    },
    stats: async () => ({ event: 'stats', bots: players.map(p => p.stats()) }),
    quit
  }

  // Commands run one after another, in the order they came.
  let queue = Promise.resolve()
  const rl = readline.createInterface({ input: process.stdin })
  rl.on('line', line => {
    const [cmd, ...args] = line.trim().split(/\s+/)
    if (!cmd) return
    queue = queue.then(async () => {
      const fn = commands[cmd]
      if (!fn) return emit({ event: 'error', error: `unknown command ${cmd}` })
      const out = await fn(...args)
      if (out) emit(out)
    }).catch(err => emit({ event: 'error', error: String(err && err.stack) }))
  })
  rl.on('close', () => { queue = queue.then(quit) })
  process.on('SIGINT', quit)
  process.on('SIGTERM', quit)
}

main().catch(err => {
  log(err && err.stack)
  process.exit(1)
})
