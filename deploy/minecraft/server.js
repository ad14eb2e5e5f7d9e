// Ferry issue #8: a flying-squid server whose whole world lives in memory, so that
// everything the players did is state CRIU has to carry across a live move.
'use strict'

const mcServer = require('flying-squid')
const defaults = require('flying-squid/config/default-settings.json')

const settings = {
  ...defaults,
  motd: 'Ferry: a live Minecraft server',
  port: Number(process.env.MC_PORT || 25565),
  'online-mode': false, // bots log in offline; the lab has no Mojang auth
  version: '1.16.5',
  'max-players': 10, // 8 playing bots and the observer that checks blocks
  'view-distance': 3, // few chunks per player: small memory, fast joins
  gameMode: 1, // creative: bots place blocks without gathering them first
  difficulty: 0, // peaceful
  'everybody-op': true, // bots may /give and /tp themselves
  logging: false, // no log file growing in the container while it moves
  kickTimeout: 30000,
  plugins: {},
  generation: { name: 'superflat', options: { worldHeight: 80 } }
}
// No worldFolder: no region files, no playerdata, no level.dat — the world is in memory only.
delete settings.worldFolder

const serv = mcServer.createMCServer(settings)
serv.on('listening', port => console.log(`ferry-minecraft: listening on ${port}`))
process.on('unhandledRejection', err => console.log('unhandledRejection', err && err.stack))
