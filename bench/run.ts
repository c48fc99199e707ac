import { benchBuild } from './build.js';
import { benchCached } from './cached.js';
import { benchControl } from './control.js';
import { benchImport } from './import.js';
import { benchVm } from './vm.js';

// `npm run bench`; BENCH_RUNS sets the runs per measurement, BENCH_ONLY=import|control|vm|cached|build picks one.
const runs = Number(process.env.BENCH_RUNS ?? 5);
const only = process.env.BENCH_ONLY;
if (!only || only === 'import') await benchImport(runs);
if (!only || only === 'control') await benchControl();
if (!only || only === 'vm') await benchVm(Math.max(runs, 10));
if (!only || only === 'cached') await benchCached(Math.max(runs, 20));
if (!only || only === 'build') await benchBuild(runs);
